import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from model import GPTTokenizer
from model.tokenizer import EOS_TOKEN, PAD_TOKEN

TRICKY = [
    "",
    "hello world",
    " leading space",
    "   three leading spaces",
    "trailing  ",
    "emoji 🙂🚀👩‍👩‍👧‍👦 flags 🇳🇱",
    "中文字符 and 日本語 and 한국어",
    "combining e\u0301 a\u0308\u0323 zalgo Z\u0351\u0336",
    "control \x00\x01\x07\x1b[0m \x7f \u200b \ufeff",
    "\r\n\t\n\n",
    EOS_TOKEN,
    f"a{EOS_TOKEN}b{PAD_TOKEN}c",
    "<|endoftext",
    "\U0010ffff \ue000",
]

text_with_specials = st.lists(
    st.one_of(
        st.text(), st.sampled_from([EOS_TOKEN, PAD_TOKEN, " ", "  ", "\n", "🙂", "中", "e\u0301"])
    ),
    max_size=8,
).map("".join)


@pytest.mark.parametrize("text", TRICKY)
def test_round_trip_examples(tokenizer, text):
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert tokenizer.eos_id not in ids and tokenizer.pad_id not in ids


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(text=st.one_of(st.text(), text_with_specials))
def test_round_trip_property(tokenizer, text):
    ids = tokenizer.encode(text)
    assert all(0 <= i < tokenizer.vocab_size for i in ids)
    assert tokenizer.decode(ids) == text


def test_user_text_never_becomes_special(tokenizer):
    ids = tokenizer.encode(f"{EOS_TOKEN}{PAD_TOKEN}")
    assert tokenizer.eos_id not in ids and tokenizer.pad_id not in ids
    assert len(ids) > 2


def test_special_tokens(tokenizer):
    assert tokenizer.eos_id != tokenizer.pad_id
    assert {tokenizer.eos_id, tokenizer.pad_id} <= set(range(tokenizer.vocab_size))
    ids = tokenizer.encode("hi")
    assert tokenizer.decode(ids + [tokenizer.pad_id, tokenizer.pad_id]) == "hi"  # pads dropped
    assert tokenizer.decode(ids + [tokenizer.eos_id]) == "hi" + EOS_TOKEN  # eos kept


def test_training_learns_merges(tokenizer):
    assert 258 < tokenizer.vocab_size <= 400
    assert len(tokenizer.encode("The quick brown fox")) < len(b"The quick brown fox")


def test_vocab_size_too_small():
    with pytest.raises(ValueError, match="vocab_size"):
        GPTTokenizer.train(["abc"], vocab_size=100)


def test_encode_batch_matches_encode(tokenizer):
    assert tokenizer.encode_batch(TRICKY) == [tokenizer.encode(t) for t in TRICKY]


def test_save_load_identical(tokenizer, tmp_path):
    file = tmp_path / "tok.json"
    tokenizer.save(file)
    tokenizer.save(tmp_path)  # a directory: writes tokenizer.json inside
    for loaded in (
        GPTTokenizer.load(file),
        GPTTokenizer.load(tmp_path),
        GPTTokenizer.from_str(tokenizer.to_str()),
    ):
        assert loaded.sha256 == tokenizer.sha256
        assert (loaded.eos_id, loaded.pad_id, loaded.vocab_size) == (
            tokenizer.eos_id,
            tokenizer.pad_id,
            tokenizer.vocab_size,
        )
        assert [loaded.encode(t) for t in TRICKY] == [tokenizer.encode(t) for t in TRICKY]
        assert tokenizer.eos_id not in loaded.encode(
            EOS_TOKEN
        )  # plain-text handling survives reload


def test_sha256_is_of_json(tokenizer):
    import hashlib

    assert tokenizer.sha256 == hashlib.sha256(tokenizer.to_str().encode()).hexdigest()
    other = GPTTokenizer.train(["something else entirely"] * 5, vocab_size=300)
    assert other.sha256 != tokenizer.sha256


def test_load_missing_names_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        GPTTokenizer.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="nope.json"):
        GPTTokenizer.load(tmp_path / "nope.json")
