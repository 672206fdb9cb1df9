"""Stage 06: generate for every system on the held-out test split, score, compare, write the report.

    prodtune evaluate --profile cpu          # reads models/cpu/{llama,deepseek,study,chroma}, writes outputs/cpu/

Nothing is trained here: every system reads a finished run folder (stages 03/04, and the study's recipe that the
pipeline trains with stages 01 and 03 before this one; without its run folder stage 06 stops and says so, unless
study-recipe is left out of `systems`). One model is on the GPU at a time: each is loaded, used for its systems and
freed before the next loads (`models.with_loaded_model`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import pandas as pd

from prodtune import metrics as M
from prodtune import models as MD
from prodtune import prompts as P
from prodtune.config import ConfigError
from prodtune.evaluate.generate import (Job, cache_key, decoding_of, plan_job, rag_settings, read_run_card, run_jobs,
                                        score_job)
from prodtune.evaluate.report import write_report
from prodtune.evaluate.score import compare
from prodtune.io import log, read_json, write_json, write_text

SYSTEMS = ("base", "base+rag", "llama-ft", "llama-ft+rag", "base-r1", "deepseek-ft", "deepseek-ft-cot", "study-recipe")
# The study sampled its Llama-track descriptions at temperature 0.2 and its DeepSeek-track answers at 0.7; every
# metric here decodes greedily, and the report says so.
STUDY_TEMPERATURES = {"llama": 0.2, "deepseek": 0.7}


@dataclass
class EvalConfig:
    """Settings of stage 06. Greedy decoding for every metric."""

    SECTION: ClassVar[str] = "evaluate"

    out_dir: str = field(default="{outputs_dir}", metadata={"help": "report, metrics and generations"})
    data_dir: str = field(default="{data_dir}/prepared", metadata={"help": "stage 01 output (its test.parquet)"})
    cot_dir: str = field(default="{data_dir}/cot", metadata={"help": "stage 02 output (its test.parquet)"})
    llama_dir: str = field(default="{models_dir}/llama", metadata={"help": "stage 03 run folder"})
    deepseek_dir: str = field(default="{models_dir}/deepseek", metadata={"help": "stage 04 run folder"})
    study_dir: str = field(default="{models_dir}/study", metadata={
        "help": "run folder of the study's recipe (stages 01 and 03 with the study recipe; the pipeline trains it)"})
    chroma_dir: str = field(default="{models_dir}/chroma", metadata={"help": "stage 05 store"})
    profile_name: str = field(default="{profile}", metadata={"help": "the profile's name, for the report (filled by the loader)"})
    n_test: int | None = field(default=None, metadata={"help": "evaluate on the first N test products (None: all)"})
    max_new_tokens: int = field(default=160, metadata={"help": "longest description generated"})
    max_new_tokens_cot: int = field(default=256, metadata={"help": "longest R1 completion (thinking + answer)"})
    batch_size: int = field(default=48, metadata={"help": "prompts per generate call and per cache flush (on 2 CPU cores a "
                                                           "SmolLM2 decode step of 32 rows took 110 ms, of 8 rows 55 ms, "
                                                           "of 1 row 36 ms: full batches pay off)"})
    max_batch_tokens: int | None = field(default=MD.DEFAULT_MAX_BATCH_TOKENS, metadata={
        "help": "cap rows x (prompt + new tokens) per generate call: long RAG prompts go fewer at a time"})
    engine: str = field(default="auto", metadata={
        "help": "greedy decoding loop: pruned (a row that reached EOS leaves the batch), transformers (model.generate), "
                "auto: pruned on a CPU, transformers' on CUDA; the same tokens either way"})
    pool: bool = field(default=True, metadata={
        "help": "generate the systems of one model together where they decode alike (fuller batches; the same tokens): "
                "false runs one system at a time"})
    rag_k: int = field(default=3, metadata={"help": "retrieved descriptions put into the RAG prompt"})
    embedder: str = field(default="embedded:all-minilm-l6-v2", metadata={"help": "sentence-transformers model for cosine"})
    n_boot: int = field(default=2000, metadata={"help": "bootstrap resamples (>= 100)"})
    seed: int = field(default=3407, metadata={"help": "bootstrap seed"})
    systems: list[str] = field(default_factory=lambda: list(SYSTEMS), metadata={
        "help": f"systems to evaluate, a subset of {', '.join(SYSTEMS)}"})
    n_examples: int = field(default=4, metadata={"help": "example answers shown side by side"})
    write_latest: bool = field(default=True, metadata={
        "help": "also copy metrics.json and the report to the parent of out_dir when out_dir is outputs/<profile>"})
    progress: bool = field(default=True, metadata={"help": "tqdm bars while generating"})

    def __post_init__(self) -> None:
        bad = sorted(set(self.systems) - set(SYSTEMS))
        if bad:
            raise ConfigError(f"evaluate.systems: unknown {bad}; allowed: {', '.join(SYSTEMS)}")
        if not self.systems:
            raise ConfigError(f"evaluate.systems: empty; name at least one of {', '.join(SYSTEMS)}")
        for name in ("max_new_tokens", "max_new_tokens_cot", "batch_size", "rag_k"):
            if getattr(self, name) < 1:
                raise ConfigError(f"evaluate.{name}: {getattr(self, name)}; must be >= 1")
        if self.engine not in MD.ENGINES:
            raise ConfigError(f"evaluate.engine: {self.engine!r}; expected one of {', '.join(MD.ENGINES)}")
        if self.n_test is not None and self.n_test < 1:
            raise ConfigError(f"evaluate.n_test: {self.n_test}; must be >= 1, or null for the whole test split")
        if self.max_batch_tokens is not None and self.max_batch_tokens < 1:
            raise ConfigError(f"evaluate.max_batch_tokens: {self.max_batch_tokens}; must be >= 1, or null for no cap")
        if self.n_boot < 100:
            raise ConfigError(f"evaluate.n_boot: {self.n_boot}; must be >= 100 (a 95% CI from fewer resamples is noise)")
        if self.n_examples < 0:
            raise ConfigError(f"evaluate.n_examples: {self.n_examples}; must be >= 0")


Config = EvalConfig


def data_provenance(data_dir: Path) -> dict[str, Any]:
    """What stage 06's test rows came from (stage 01's stats.json `input`), and whether it is the committed sample
    of invented text (`data/sample/`, written from templates by make_sample.py): figures on it measure how well a
    model learns those templates, not how it describes real products."""
    stats = data_dir / "stats.json"
    src = str(read_json(stats).get("input", "")) if stats.is_file() else ""
    p = Path(src)
    invented = p.name.startswith("trn_sample") and p.parent.name == "sample" and p.parent.parent.name == "data"
    return {"input": src, "invented": invented, "real": bool(src) and not invented}


def _cot_test(cot_dir: Path, n: int | None) -> pd.DataFrame | None:
    path = cot_dir / "test.parquet"
    if not path.is_file():
        log.warning("evaluate: %s missing; the CoT systems are skipped", path)
        return None
    df = pd.read_parquet(path)
    return df.iloc[:n] if n else df


def run(cfg: EvalConfig) -> dict[str, Any]:
    """Run stage 06: generate for every system of `cfg.systems` on the test split, score, compare, write the report.

    Generations are cached per system in `<out_dir>/generations/<system>.jsonl` (resumable; a changed model, prompt
    or setting regenerates only what changed).

    Returns:
        The metrics dict written to `<out_dir>/metrics.json`: system -> metric -> {mean, lo, hi, n}, plus
        `comparisons` (paired differences) and `meta`.

    Raises:
        FileNotFoundError: a run folder or data file a chosen system needs is missing (the message says what to run).
    """
    t0 = time.perf_counter()
    out = Path(cfg.out_dir)
    gen_dir = out / "generations"
    systems = list(cfg.systems)
    test_path = Path(cfg.data_dir) / "test.parquet"
    if not test_path.is_file():
        raise FileNotFoundError(f"{test_path}: missing; run stage 01 first (notebook 01, `prodtune prepare`)")
    test = pd.read_parquet(test_path)
    if cfg.n_test:
        test = test.iloc[: cfg.n_test]
    test = test.reset_index(drop=True)
    # Every run card is read before anything is generated, so a missing run fails in seconds, not after an hour.
    llama_card = read_run_card(cfg.llama_dir, "train the Llama track first (notebook 03, `prodtune train --track llama`)")
    ds_card = (read_run_card(cfg.deepseek_dir, "train the DeepSeek track first (notebook 04, `prodtune train --track deepseek`)")
               if any(s.startswith("deepseek") for s in systems) else None)
    study_card = (read_run_card(cfg.study_dir, "the study's recipe is trained before stage 06: run stages 01 and 03 with "
                                "`--recipe study` (the pipeline's stages 01s and 03s), or drop study-recipe from "
                                "evaluate.systems") if "study-recipe" in systems else None)
    base_model = llama_card["base_model"]
    embedder = M.Embedder(cfg.embedder)
    per_system: dict[str, pd.DataFrame] = {}
    summary: dict[str, dict[str, dict[str, float]]] = {}
    timings: dict[str, float] = {}

    def job(name: str, tok: Any, rows: pd.DataFrame, track: str, fingerprint: str, **kw: Any) -> Job:
        return plan_job(rows, name=name, track=track, tokenizer=tok, max_new_tokens=cfg.max_new_tokens_cot if track == "deepseek"
                        else cfg.max_new_tokens, max_context_chars=rag["max_chars"], cache=gen_dir / f"{name}.jsonl",
                        fingerprint=fingerprint, **kw)

    def run_systems(model: Any, tok: Any, jobs: list[Job]) -> None:
        """Generate the jobs of one model (pooled where their decoding is the same), then score each."""
        if not jobs:
            return
        t = time.perf_counter()
        secs: dict[str, float] = {}
        for pool in [jobs] if cfg.pool else [[j] for j in jobs]:
            secs.update(run_jobs(model, tok, pool, batch_size=cfg.batch_size, max_batch_tokens=cfg.max_batch_tokens,
                                 progress=cfg.progress, engine=cfg.engine))
        for j in jobs:
            per_system[j.name], summary[j.name] = score_job(j, embedder, cfg.n_boot, cfg.seed)
            timings[j.name] = round(secs[j.name], 1)
            log.info("evaluate: %s done (%.0fs of generation)", j.name, timings[j.name])
        log.info("evaluate: %s generated and scored in %.0fs", ", ".join(j.name for j in jobs), time.perf_counter() - t)

    # RAG contexts: retrieved once, the product itself excluded, shown as the Llama run was trained to read them
    # (its card's k, similarity threshold and length cap; the study's k neighbours, all shown, without one).
    rag = rag_settings(llama_card, cfg.rag_k)
    contexts: list[list[str]] = [[] for _ in range(len(test))]
    with_rag = any(s.endswith("+rag") for s in systems)
    if with_rag:
        from prodtune.rag import open_store, retrieve_context

        store = open_store(cfg.chroma_dir)
        contexts = [P.shown_contexts(retrieve_context(store, t, k=rag["k"], exclude_uids=[u]), rag["min_score"])
                    for t, u in zip(test.title, test.uid)]

    # Base and Llama track: one peft model, the adapter switched off for the base systems. Each model below is freed
    # before the next loads (with_loaded_model): a T4 or an 8 GB card holds one 8B model in 4-bit, not two.
    base_fp, llama_fp = cache_key("base", base_model), cache_key(llama_card.get("fingerprint"), llama_card.get("utc"))
    cot_test = _cot_test(Path(cfg.cot_dir), cfg.n_test) if {"base-r1", "deepseek-ft-cot"} & set(systems) else None

    # Decoding: each run's card (`generation`, chosen on validation); the base model decodes as the run it is
    # compared with, so a difference between them is the fine-tune's, not the decoding's.
    llama_dec = decoding_of(llama_card)
    ds_dec = decoding_of(ds_card) if ds_card is not None else decoding_of({})

    def llama_systems(model: Any, tok: Any) -> None:
        base_jobs = []
        if "base" in systems:
            base_jobs.append(job("base", tok, test, "llama", base_fp, decoding=llama_dec))
        if "base+rag" in systems:
            base_jobs.append(job("base+rag", tok, test, "llama", base_fp, contexts=contexts, decoding=llama_dec))
        if "base-r1" in systems and cot_test is not None:
            base_jobs.append(job("base-r1", tok, cot_test, "deepseek", base_fp, decoding=ds_dec))
        with model.disable_adapter():
            run_systems(model, tok, base_jobs)
        ft_jobs = []
        if "llama-ft" in systems:
            ft_jobs.append(job("llama-ft", tok, test, "llama", llama_fp, decoding=llama_dec))
        if "llama-ft+rag" in systems:
            ft_jobs.append(job("llama-ft+rag", tok, test, "llama", llama_fp, contexts=contexts, decoding=llama_dec))
        run_systems(model, tok, ft_jobs)

    MD.with_loaded_model(base_model, cfg.llama_dir, llama_systems)

    if ds_card is not None:
        ds_fp = cache_key(ds_card.get("fingerprint"), ds_card.get("utc"))

        def deepseek_systems(model: Any, tok: Any) -> None:
            jobs = []
            if "deepseek-ft" in systems:
                jobs.append(job("deepseek-ft", tok, test, "deepseek", ds_fp, task="description", decoding=ds_dec))
            if "deepseek-ft-cot" in systems and cot_test is not None:
                jobs.append(job("deepseek-ft-cot", tok, cot_test, "deepseek", ds_fp, decoding=ds_dec))
            run_systems(model, tok, jobs)

        MD.with_loaded_model(ds_card["base_model"], cfg.deepseek_dir, deepseek_systems)

    if study_card is not None:
        from prodtune.data import reference_clean

        # The study fed its model regex-cleaned titles; its answers are scored against our readable references.
        study_fp = cache_key(study_card.get("fingerprint"), study_card.get("utc"))
        MD.with_loaded_model(study_card["base_model"], cfg.study_dir, lambda model, tok: run_systems(model, tok, [
            job("study-recipe", tok, test, "llama", study_fp, prompt_title=reference_clean,
                decoding=decoding_of(study_card))]))

    order = [s for s in SYSTEMS if s in per_system]  # one order in the report, whatever order they ran in
    per_system = {s: per_system[s] for s in order}
    meta = {
        "profile": cfg.profile_name, "base_model": base_model, "n_test": len(test), "decoding": "greedy",
        "study_temperatures": dict(STUDY_TEMPERATURES), "rag_k": rag["k"], "rag": rag,
        "rag_shown": sum(1 for c in contexts if c) if with_rag else None,
        "decoding_llama": llama_dec, "decoding_deepseek": ds_dec, "data": data_provenance(Path(cfg.data_dir)),
        "prompt_version": P.PROMPT_VERSION,
        # system_seconds: generation time; pooled systems share each batch's time by row
        "seconds": round(time.perf_counter() - t0, 1), "system_seconds": timings, "rag_excludes_own_product": True,
    }
    result = {**{s: summary[s] for s in order}, "comparisons": compare(per_system, cfg.n_boot, cfg.seed), "meta": meta}
    write_json(out / "metrics.json", result)
    for name, df in per_system.items():
        df.to_csv(gen_dir / f"{name}.scores.csv", index=False)
    write_report(result, per_system, out, run_dirs={"llama": cfg.llama_dir, "deepseek": cfg.deepseek_dir,
                                                     "study-recipe": cfg.study_dir}, n_examples=cfg.n_examples)
    if cfg.write_latest and out.name == cfg.profile_name:
        for name in ("metrics.json", "report.md", "report.html"):
            write_text(out.parent / name, (out / name).read_text(encoding="utf-8"))
    log.info("evaluate: wrote %s/{metrics.json,report.md,report.html} in %.0fs", out, meta["seconds"])
    return result
