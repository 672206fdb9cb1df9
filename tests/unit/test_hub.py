"""Publishing (`prodtune push`, `prodtune.hub`) and the CoT dataset's push, against a loopback stand-in for the Hub.

    HF_HUB_OFFLINE=1 .venv/bin/pytest tests/unit/test_hub.py -x -q          # ~1 min on 2 CPU cores

The stand-in (tests/hubserver.py) implements the endpoints huggingface_hub 1.33 calls for `create_repo`,
`create_commit` (regular files and LFS "basic" uploads; hf_xet's transfer protocol is switched off with
HF_HUB_DISABLE_XET=1) and reading a repository back, and keeps every uploaded byte, so the tests compare what
arrived with the run folder. Uploads run in a subprocess with HF_ENDPOINT pointing at it (huggingface_hub reads
its endpoint and offline switch at import), as a user would run them. No network.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hubserver import FakeHub
from test_assistant import make_run

from conftest import ROOT
from prodtune import hub as H
from prodtune import models as MD
from prodtune.io import UserError

TOKEN = "hf_pushTestToken0123456789abcdefXYZ"  # must never leave the environment
CARD = {"steps": 60, "epochs": 0.779, "global_batch_size": 4, "seconds": 327.72, "train_seconds": 288.55,
        "seconds_per_step": 4.809, "tokens_per_second": 139.8, "utc": "2026-12-04T17:59:17Z", "loss_on": "completion",
        "train_loss": [{"step": 1, "loss": 3.9613}, {"step": 60, "loss": 0.7092}],
        "eval_loss": [{"step": 0, "loss": 3.9798}, {"step": 60, "loss": 0.7337}],
        "rows": {"train": {"rows": 305}}, "config": {"lora_r": 16, "lora_alpha": 16, "target_modules": ["q_proj"]}}
METRICS = {"llama-ft": {"rouge_l": {"mean": 0.2468, "lo": 0.2012, "hi": 0.2931, "n": 40}},
           "base": {"rouge_l": {"mean": 0.0811, "lo": 0.0615, "hi": 0.1002, "n": 40}},
           "deepseek-ft-cot": {"think_ok": {"mean": 0.9, "lo": 0.8, "hi": 1.0, "n": 40}},
           "comparisons": [], "meta": {"profile": "t", "n_test": 40, "decoding": "greedy"}}


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """<root>/models/t/{llama,deepseek} (tiny runs with a run card's figures) and <root>/outputs/t/metrics.json."""
    root = tmp_path_factory.mktemp("proj")
    tiny = MD.make_tiny_llama(root / "base")
    for i, track in enumerate(("llama", "deepseek")):
        make_run(tiny, root / "models" / "t" / track, track, str(tiny), seed=i, card=CARD)
        (root / "models" / "t" / track / "training_args.bin").write_bytes(b"a pickle the Trainer writes")
    (root / "outputs" / "t").mkdir(parents=True)
    (root / "outputs" / "t" / "metrics.json").write_text(json.dumps(METRICS))
    return root


@pytest.fixture
def hub():
    with FakeHub(TOKEN, lfs_threshold=10_000) as h:
        yield h


def hub_env(hub: FakeHub, tmp: Path, token: str | None = TOKEN) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
    env.update(HF_ENDPOINT=hub.url, HF_HUB_OFFLINE="0", TRANSFORMERS_OFFLINE="0", HF_HUB_DISABLE_XET="1",
               HF_HOME=str(tmp / "hf_home"), HF_HUB_DISABLE_TELEMETRY="1", PYTHONUNBUFFERED="1")
    if token is not None:
        env["HF_TOKEN"] = token
    return env


def prodtune(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "prodtune", *args], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=300)


def assert_token_nowhere(res: subprocess.CompletedProcess, hub: FakeHub, *folders: Path) -> None:
    """The token is in no output, no file under `folders`, and no uploaded file."""
    assert TOKEN not in res.stdout and TOKEN not in res.stderr
    for folder in folders:
        for p in folder.rglob("*"):
            if p.is_file():
                assert TOKEN.encode() not in p.read_bytes(), p
    for repo in hub.repos.values():
        for name, data in repo.files.items():
            assert TOKEN.encode() not in data, name


# ----------------------------------------------------------------------------------------------
# In-process: what goes up, the card, where metrics are found
# ----------------------------------------------------------------------------------------------


def test_metrics_are_looked_for_beside_the_models_folder_and_kept_for_the_track(project: Path) -> None:
    run = project / "models" / "t" / "llama"
    looked = H.metrics_candidates(run)
    assert looked[0] == (project / "outputs" / "t" / "metrics.json").resolve()
    found, path, _ = H.find_metrics(run, "llama")
    assert path == looked[0] and list(found["systems"]) == ["llama-ft", "base"]  # fine-tuned first; no deepseek
    found, _, _ = H.find_metrics(project / "models" / "t" / "deepseek", "deepseek")
    assert list(found["systems"]) == ["deepseek-ft-cot"]
    assert H.find_metrics(project / "models" / "nowhere" / "llama", "llama")[0] is None
    with pytest.raises(UserError, match="no such file"):
        H.find_metrics(run, "llama", metrics=project / "missing.json")


def test_the_card_carries_the_run_figures_and_the_metrics(project: Path) -> None:
    card = json.loads((project / "models" / "t" / "llama" / "run_card.json").read_text())
    found, _, _ = H.find_metrics(project / "models" / "t" / "llama", "llama")
    text = H.model_card(card, "me/x", ["adapter", "gguf"], ["adapter_model.safetensors", "gguf/llama-f16.gguf"], found)
    assert text.startswith("---\n") and "library_name: peft" in text and "- gguf" in text
    for figure in ("60 (0.779 epochs, 4 rows per step)", "3.961 (step 1) -> 0.709 (step 60)",
                   "3.980 (step 0) -> 0.734 (step 60)", "327.7 s in all, 288.6 s training", "| training rows | 305 |",
                   "0.247 [0.201, 0.293]", "| llama-ft |", "40 held-out products", "gguf/llama-f16.gguf",
                   "### Response:", "r 16, alpha 16"):
        assert figure in text, figure
    assert "base_model:" not in text  # a local folder has no Hub id
    assert "Not evaluated" in H.model_card(card, "me/x", ["adapter"], [], None)
    embedded = H.model_card({**card, "base_model": MD.EMBEDDED_LLM}, "me/x", ["adapter"], [], None)
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in embedded
    # the uploaded adapter_config.json names the base's Hub id (the saved one names a local folder)
    run = project / "models" / "t" / "llama"
    assert H.adapter_config_for_hub(run, str(project / "base")) is None
    cfg = json.loads(H.adapter_config_for_hub(run, MD.EMBEDDED_LLM))
    assert cfg["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.mark.parametrize(("what", "said"), [("adapter,weights", "choose from adapter,merged,gguf"), (",", "(empty)")])
def test_bad_parts_are_user_errors(what: str, said: str) -> None:
    with pytest.raises(UserError, match=said):
        H.parse_what(what)


def test_only_the_adapter_folder_s_own_files_go_up(project: Path) -> None:
    run = project / "models" / "t" / "llama"
    files = H.collect_files(run)
    assert list(files) == ["adapter"]  # no export yet
    names = {dest for _, dest in files["adapter"]}
    assert {"adapter_config.json", "adapter_model.safetensors", "run_card.json", "tokenizer.json"} <= names
    with pytest.raises(UserError, match=r"prodtune export --run .* --to merged"):
        H.collect_files(run, ["merged"])


# ----------------------------------------------------------------------------------------------
# `prodtune push` against the stand-in
# ----------------------------------------------------------------------------------------------


def test_push_uploads_the_adapter_and_a_card_and_never_shows_the_token(project: Path, hub: FakeHub, tmp_path: Path) -> None:
    run = project / "models" / "t" / "llama"
    res = prodtune(hub_env(hub, tmp_path), "push", "--run", str(run), "--repo", "me/prodtune-llama")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["parts"] == ["adapter"] and out["private"] is False and out["commit"]
    assert out["metrics"] == str((project / "outputs" / "t" / "metrics.json").resolve())
    repo = hub.repo("me/prodtune-llama")
    assert repo.private is False and len(repo.commits) == 1
    expected = {p.name for p in run.iterdir() if p.is_file()} - H.NOT_UPLOADED | {"README.md"}
    assert "training_args.bin" not in repo.files
    assert set(repo.files) == expected
    for name in expected - {"README.md"}:
        assert repo.files[name] == (run / name).read_bytes(), name  # byte for byte
    assert "adapter_model.safetensors" in repo.lfs  # binaries through LFS, as on the Hub
    readme = repo.files["README.md"].decode()
    assert "3.961 (step 1) -> 0.709 (step 60)" in readme and "0.247 [0.201, 0.293]" in readme
    assert_token_nowhere(res, hub, run, tmp_path)
    # the same push again: the Hub skips unchanged files, the repository is not created twice
    res = prodtune(hub_env(hub, tmp_path), "push", "--run", str(run), "--repo", "me/prodtune-llama")
    assert res.returncode == 0, res.stderr
    assert len(hub.repos) == 1 and len(hub.repo("me/prodtune-llama").commits) == 1
    assert not hub.unknown, hub.unknown


def test_push_sends_the_exports_private(project: Path, hub: FakeHub, tmp_path: Path) -> None:
    from prodtune.export import export

    run = project / "models" / "t" / "deepseek"
    export(run, to="merged", device="cpu")
    export(run, to="gguf", ollama=True, device="cpu")
    res = prodtune(hub_env(hub, tmp_path), "push", "--run", str(run), "--repo", "me/prodtune-r1", "--private",
                   "--what", "gguf,merged")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout.strip().splitlines()[-1])["parts"] == ["gguf", "merged"]
    repo = hub.repo("me/prodtune-r1")
    assert repo.private is True
    merged, gguf = run / "export" / "merged", run / "export" / "gguf"
    want = {f"merged/{p.relative_to(merged).as_posix()}": p for p in merged.rglob("*") if p.is_file()}
    want |= {f"gguf/{p.name}": p for p in gguf.iterdir() if p.is_file()}
    assert set(repo.files) == set(want) | {"README.md"}  # no adapter: --what left it out
    for name, path in want.items():
        assert repo.files[name] == path.read_bytes(), name
    assert {"gguf/deepseek-f16.gguf", "merged/model.safetensors"} <= repo.lfs
    readme = repo.files["README.md"].decode()
    assert "subfolder=\"merged\"" in readme and "ollama create" in readme and "<think>" in readme
    assert "| deepseek-ft-cot |" in readme and "| llama-ft |" not in readme
    assert_token_nowhere(res, hub, run, tmp_path)


def test_push_errors_are_one_line_and_exit_2(project: Path, hub: FakeHub, tmp_path: Path) -> None:
    run = str(project / "models" / "t" / "llama")
    res = prodtune(hub_env(hub, tmp_path, token=None), "push", "--run", run, "--repo", "me/x")
    assert res.returncode == 2 and res.stderr.strip().count("\n") == 0, res.stderr
    assert "HF_TOKEN is not set" in res.stderr and "export HF_TOKEN=" in res.stderr
    res = prodtune(hub_env(hub, tmp_path), "push", "--run", run, "--repo", "me/x", "--what", "adapter,gguf")
    assert res.returncode == 2 and "--to gguf --ollama` first" in res.stderr
    res = prodtune(hub_env(hub, tmp_path), "push", "--run", run, "--repo", "no-owner")
    assert res.returncode == 2 and "OWNER/NAME" in res.stderr
    wrong = "hf_wrongTokenForThisHub000000000000"
    res = prodtune(hub_env(hub, tmp_path, token=wrong), "push", "--run", run, "--repo", "me/x")
    assert res.returncode == 2 and "HTTP 401" in res.stderr and "write token" in res.stderr, res.stderr
    assert wrong not in res.stderr and wrong not in res.stdout
    env = {**hub_env(hub, tmp_path), "HF_HUB_OFFLINE": "1"}
    res = prodtune(env, "push", "--run", run, "--repo", "me/x")
    assert res.returncode == 2 and "HF_HUB_OFFLINE=0" in res.stderr, res.stderr
    assert not hub.repos  # nothing was created by any of them


# ----------------------------------------------------------------------------------------------
# The CoT dataset (stage 02's prodtune.cot.push_to_hub)
# ----------------------------------------------------------------------------------------------


def test_cot_dataset_push_uploads_the_card_and_the_splits(hub: FakeHub, prepared_dir: Path, tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    from prodtune import cot

    out = tmp_path / "cot"
    cot.run(cot.CoTConfig(data_dir=str(prepared_dir), out_dir=str(out), backend="template", progress=False))
    code = f"from prodtune.cot import push_to_hub; print(push_to_hub({str(out)!r}, 'me/prodtune-cot'))"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env=hub_env(hub, tmp_path), timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    repo = hub.repo("me/prodtune-cot", "dataset")
    assert repo.private is True  # push_to_hub's default
    card = repo.files["README.md"].decode()
    local_card = (out / "README.md").read_text()
    body = local_card.split("---", 2)[2]
    assert body.strip() in card  # datasets kept the card's text and rewrote only its YAML metadata
    assert "configs:" in card and "dataset_info:" in card
    for split in ("train", "validation", "test"):
        if not (out / f"{split}.parquet").is_file() or not pq.read_metadata(out / f"{split}.parquet").num_rows:
            continue
        name = f"data/{split}-00000-of-00001.parquet"
        assert name in repo.lfs
        got = pq.read_table(io.BytesIO(repo.files[name])).to_pylist()
        assert got == pq.read_table(out / f"{split}.parquet").to_pylist(), split
    assert_token_nowhere(res, hub, out, tmp_path)
    assert not hub.unknown, hub.unknown
