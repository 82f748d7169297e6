"""`gptctl eval` in process: our lm-eval model class against transformers, the CLI end to end
with metrics in a real MLflow server, and an unknown task refused before any model loads."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from lm_eval.api.instance import Instance

from model import GPTTokenizer, SamplingParams, generate, load_pretrained
from orchestrator import cli
from orchestrator.eval.lm_eval_model import GPTCtlLM
from orchestrator.registry.export import export_hf

transformers = pytest.importorskip("transformers")

TASKS_DIR = str(Path(__file__).resolve().parents[2] / "examples" / "lm_eval_tasks")

PAIRS = [
    ("Question: Where does Alice live?\nAnswer:", " Paris"),
    ("Alice lives in", " Rome. Carol lives in Oslo."),
    ("x", " the quick brown fox"),
    # longer than block_size (32 tokens): truncated on the left, as lm-eval's HF model does
    ("The quick brown fox jumps over the lazy dog. " * 4, "Bees make honey."),
]
DOCS = ["Alice lives in Paris. Bob lives in Rome. Carol lives in Oslo. " * 3, "Bees make honey."]


def _instances(kind: str, args_list) -> list[Instance]:
    return [Instance(request_type=kind, doc={}, arguments=args, idx=i) for i, args in enumerate(args_list)]


def _hf_loglikelihood(hf, context: list[int], continuation: list[int], block_size: int) -> float:
    whole = (context + continuation)[-(block_size + 1):]
    with torch.no_grad():
        logits = hf(torch.tensor([whole[:-1]])).logits[0]
    logprobs = F.log_softmax(logits.float(), dim=-1)
    targets = torch.tensor(whole[-len(continuation):])
    return logprobs[-len(continuation):].gather(1, targets[:, None]).sum().item()


def test_loglikelihoods_match_transformers_on_the_hf_export(eval_checkpoint, tmp_path):
    export_hf(str(eval_checkpoint), str(tmp_path / "hf"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), local_files_only=True).eval()
    lm = GPTCtlLM(checkpoint=str(eval_checkpoint), batch_size=3)  # batches of mixed lengths: padding
    tok = lm.tok

    ours = lm.loglikelihood(_instances("loglikelihood", PAIRS))
    for (context, continuation), (score, greedy) in zip(PAIRS, ours):
        ctx, cont = lm._encode_pair(context, continuation)
        assert abs(score - _hf_loglikelihood(hf, ctx, cont, 32)) < 1e-4, (context, continuation)
        assert isinstance(greedy, bool)

    rolling = lm.loglikelihood_rolling(_instances("loglikelihood_rolling", [(d,) for d in DOCS]))
    for doc, total in zip(DOCS, rolling):
        # reference: every token scored once, each window of at most 32 positions fed to transformers
        ids = tok.encode(doc)
        assert len(ids) > 32 or doc == DOCS[1]
        expected, position = 0.0, 0
        while position < len(ids):
            end = min(position + 32, len(ids))
            window = ([tok.eos_id] + ids)[max(0, end - 32): end + 1]  # inputs+target: as lm-eval's windows
            n_pred = end - position
            with torch.no_grad():
                logits = hf(torch.tensor([window[:-1]])).logits[0]
            logprobs = F.log_softmax(logits.float(), dim=-1)[-n_pred:]
            expected += logprobs.gather(1, torch.tensor(window[-n_pred:])[:, None]).sum().item()
            position = end
        assert abs(total - expected) < 1e-4


def test_generate_until_is_greedy_decoding_cut_at_the_stop_string(eval_checkpoint):
    lm = GPTCtlLM(checkpoint=str(eval_checkpoint), batch_size=4)
    model, tok = load_pretrained(eval_checkpoint), GPTTokenizer.load(eval_checkpoint)
    prompts = ["Question: Where does Alice live?\nAnswer:", "Alice lives", "Bees", "The quick brown fox " * 3]
    gen_kwargs = {"until": ["."], "max_gen_toks": 6, "do_sample": False}
    texts = lm.generate_until(_instances("generate_until", [(p, dict(gen_kwargs)) for p in prompts]))
    for prompt, text in zip(prompts, texts):
        ids = tok.encode(prompt)[-(32 - 6):]  # room left for the answer, as lm-eval's HF model leaves
        new = generate(model, ids, SamplingParams(max_new_tokens=6, temperature=0.0,
                                                  stop_token_ids=(tok.eos_id,)))
        assert text == tok.decode(new).split(".")[0]


def test_eval_cli_logs_metrics_on_the_checkpoint_run(eval_checkpoint, tmp_path, mlflow_server, capsys):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server)
    experiment = client.create_experiment("lmeval-test")
    run_id = client.create_run(experiment).info.run_id
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    for f in eval_checkpoint.iterdir():
        (checkpoint / f.name).write_bytes(f.read_bytes())
    (checkpoint / "trainer_state.json").write_text(json.dumps({"mlflow_run_id": run_id, "step": 3}))

    code = cli.main(["eval", str(checkpoint), "--tasks", "gptctl_tiny", "--include-path", TASKS_DIR,
                     "--limit", "3", "--batch-size", "4", "--tracking-uri", mlflow_server,
                     "--output", str(tmp_path / "results.json")])
    assert code == 0
    assert run_id in capsys.readouterr().out
    metrics = client.get_run(run_id).data.metrics
    for key in ("lm_eval/gptctl_tiny_mc/acc", "lm_eval/gptctl_tiny_gen/exact_match",
                "lm_eval/gptctl_tiny_ppl/word_perplexity", "lm_eval/gptctl_tiny_ppl/bits_per_byte"):
        assert key in metrics, sorted(metrics)
    written = json.loads((tmp_path / "results.json").read_text())
    assert metrics["lm_eval/gptctl_tiny_mc/acc"] == pytest.approx(written["results"]["gptctl_tiny_mc"]["acc,none"])
    artifacts = [a.path for a in client.list_artifacts(run_id, "lm_eval")]
    assert "lm_eval/results.json" in artifacts


def test_bad_flags_exit_2_before_any_model_loads(tmp_path, capsys):
    missing = tmp_path / "no-such-checkpoint"  # never opened: the tasks are checked first
    code = cli.main(["eval", str(missing), "--tasks", "gptctl_tiny_mc,gptctl_tiny_mcq", "--include-path", TASKS_DIR])
    assert code == 2
    err = capsys.readouterr().err
    assert "--tasks" in err and "'gptctl_tiny_mcq'" in err and "did you mean: gptctl_tiny_mc" in err
    assert "no-such-checkpoint" not in err
    assert cli.main(["eval", str(missing), "--tasks", "gptctl_tiny_mc", "--include-path", str(missing)]) == 2
    assert "--include-path" in capsys.readouterr().err
    assert cli.main(["eval", str(missing), "--tasks", "gptctl_tiny_mc", "--include-path", TASKS_DIR,
                     "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--run-id", "no-such-run"]) == 2
    assert "--run-id" in capsys.readouterr().err
