"""Bad input: a clear message naming the field or file, exit code 2, nothing submitted."""
from __future__ import annotations

import contextlib
import http.server
import shutil
import ssl
import subprocess
import sys
import threading
from pathlib import Path
from typing import Iterator


from infra.s3_endpoint import free_port
from orchestrator.cli import EXIT_BAD_INPUT, main


def _run(argv, capsys) -> tuple[int, str]:
    code = main(argv)
    return code, capsys.readouterr().err


def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_unknown_field_is_named_with_expected_fields(tmp_path, capsys):
    spec = _write(tmp_path / "job.yaml", "kind: pretrain\nname: x\ndata: ./d\ntrain:\n  max_step: 10\n")
    code, err = _run(["validate", spec], capsys)
    assert code == EXIT_BAD_INPUT
    assert "train.max_step: unknown field" in err and "max_steps" in err and "job.yaml" in err


def test_wrong_type_and_kind_are_named(tmp_path, capsys):
    spec = _write(tmp_path / "job.yaml", "kind: pretrain\nname: x\ndata: ./d\ntrain:\n  zero_stage: 5\n")
    code, err = _run(["validate", spec], capsys)
    assert code == EXIT_BAD_INPUT and "train.zero_stage" in err
    spec = _write(tmp_path / "kind.yaml", "kind: pretrian\nname: x\n")
    code, err = _run(["validate", spec], capsys)
    assert code == EXIT_BAD_INPUT and "pretrain, finetune, deploy" in err


def test_missing_spec_and_missing_input_file(tmp_path, capsys):
    code, err = _run(["submit", str(tmp_path / "nope.yaml")], capsys)
    assert code == EXIT_BAD_INPUT and "nope.yaml" in err
    code, err = _run(["data", "prepare", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "out")], capsys)
    assert code == EXIT_BAD_INPUT and "missing.txt" in err
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_unreachable_s3_endpoint(tmp_path, capsys, monkeypatch):
    endpoint = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    spec = _write(tmp_path / "job.yaml", "kind: pretrain\nname: x\ndata: s3://bucket/shards\n")
    code, err = _run(["--s3-endpoint", endpoint, "submit", spec], capsys)
    assert code == EXIT_BAD_INPUT and endpoint in err


def test_data_without_manifest(tmp_path, capsys):
    spec = _write(tmp_path / "job.yaml", f"kind: pretrain\nname: x\ndata: {tmp_path}\n")
    code, err = _run(["submit", spec], capsys)
    assert code == EXIT_BAD_INPUT and "manifest.json" in err and str(tmp_path) in err


def test_checkpoint_path_without_checkpoint(tmp_path, capsys):
    code, err = _run(["deploy", str(tmp_path)], capsys)
    assert code == EXIT_BAD_INPUT and "holds no gptctl checkpoint" in err and "model.safetensors" in err


def test_console_script_exit_code(tmp_path):
    spec = _write(tmp_path / "job.yaml", "kind: finetune\nname: x\n")
    gptctl = shutil.which("gptctl", path=str(Path(sys.executable).parent))
    assert gptctl, "the gptctl console script is installed"
    done = subprocess.run([gptctl, "validate", spec], capture_output=True, text=True, timeout=120)
    assert done.returncode == EXIT_BAD_INPUT
    assert "init_from" in done.stderr and "data" in done.stderr


def test_an_mlflow_server_that_does_not_answer_is_named_in_seconds(tmp_path, capsys):
    """MLflow's client would retry for ~4 minutes and end in a bare MlflowException."""
    import pytest

    from orchestrator.runs import TrackingUnreachable, check_tracking_reachable

    server = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(TrackingUnreachable, match=rf"^tracking\.uri: the MLflow server at {server} does not answer"):
        check_tracking_reachable(server, attempts=1)
    spec = _write(tmp_path / "deploy.yaml", f"kind: deploy\ncheckpoint: models:/qa@best\ntracking_uri: {server}\n")
    code, err = _run(["submit", spec], capsys)
    assert code == EXIT_BAD_INPUT and f"models:/qa@best: the MLflow server at {server} does not answer" in err


@contextlib.contextmanager
def _server_answering(status: int, tls: ssl.SSLContext | None = None) -> Iterator[str]:
    """A loopback HTTP(S) server answering every GET with `status`; yields its base URL."""
    class Answer(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(status)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Answer)
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"{'https' if tls else 'http'}://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


def test_any_http_answer_means_the_tracking_server_is_up():
    """Auth and paths are MLflow's to judge; only a missing server is refused early."""
    from orchestrator.runs import check_tracking_reachable

    with _server_answering(404) as url:
        check_tracking_reachable(url, attempts=1)
    check_tracking_reachable("sqlite:///nowhere/mlflow.db")  # a local store: nothing to reach


def test_a_tracking_server_behind_a_private_certificate_is_up(tmp_path):
    """Which certificates to trust is MLflow's to judge too (REQUESTS_CA_BUNDLE,
    MLFLOW_TRACKING_SERVER_CERT_PATH, MLFLOW_TRACKING_INSECURE_TLS): a server whose certificate
    the probe's own trust store does not know still answers."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    from orchestrator.runs import check_tracking_reachable

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "private-ca-mlflow")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                   .serial_number(x509.random_serial_number()).not_valid_before(now)
                   .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
    (tmp_path / "cert.pem").write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    with _server_answering(200, tls) as url:
        check_tracking_reachable(url, attempts=1)
