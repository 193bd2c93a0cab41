"""Shared test helpers, and one fixture for the whole suite: compiled programs are dropped
after every test module."""

import atexit
import gc
import json
import os
import shutil
import tempfile

import jax
import pytest


def _share_compiled_programs():
    """A persistent XLA compilation cache for this pytest run, in a temporary directory removed
    at exit: the many tests (and the CLI subprocesses they start, which inherit the
    environment) that build the same small models compile each program once. Off with
    ``STARFLOW_TEST_COMPILE_CACHE=0``; a ``JAX_COMPILATION_CACHE_DIR`` already set is kept."""
    if os.environ.get("STARFLOW_TEST_COMPILE_CACHE", "1") == "0" or os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return
    path = tempfile.mkdtemp(prefix="starflow-test-xla-cache-")
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = path
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.2"
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)


_share_compiled_programs()


@pytest.fixture(autouse=True, scope="module")
def _drop_compiled_programs():
    """Each compiled XLA:CPU program keeps its code mapped (many ``mmap`` regions); over the
    whole suite in one process they passed the kernel's ``vm.max_map_count`` (65,530), after
    which LLVM's JIT crashed the run with a segmentation fault inside a compile. Dropping
    the jit caches after each module keeps the count bounded (12,000 maps after two modules
    without this)."""
    yield
    jax.clear_caches()
    gc.collect()


def reference_case_path(name):
    """The path of reference case ``name`` in the cases directory (the repository's
    ``tests/reference_cases``, or ``$STARFLOW_REFERENCE_CASES``); the test is skipped, saying
    so, when that directory has no such case."""
    from starflow_jax.interop import reference_cases as rc

    path = rc.cases_dir() / f"{name}.npz"
    if not path.is_file():
        where = f"${rc.ENV_VAR}={rc.cases_dir()}" if os.environ.get(rc.ENV_VAR) else str(rc.cases_dir())
        pytest.skip(f"reference case {name}.npz is not in {where} (the repository's cases: tests/reference_cases)")
    return path


def reference_case(name):
    """Reference case ``name`` loaded (skips the test when absent: ``reference_case_path``)."""
    from starflow_jax.interop import reference_cases as rc

    return rc.load_case(reference_case_path(name))


def write_case_config(tmp_path, case):
    """A config file (JSON of reference Model kwargs) for a reference case's model."""
    path = tmp_path / f"{case.name}_model_kwargs.json"
    path.write_text(json.dumps(case.meta["model_kwargs"]))
    return path


def make_t5_tokenizer(root):
    """A T5 tokenizer directory (sentencepiece unigram, 200 pieces: pad 0, eos 1, unk 2, no
    sentinels) trained offline on a generated corpus and saved with ``save_pretrained``."""
    import io
    import random

    import sentencepiece as spm
    import transformers

    rng = random.Random(0)
    syllables = [
        "ka",
        "to",
        "ri",
        "mel",
        "sun",
        "dor",
        "pa",
        "lex",
        "qui",
        "vo",
        "an",
        "be",
        "ce",
        "di",
        "fo",
        "gu",
        "ho",
        "ja",
        "ne",
        "sto",
        "pre",
        "tra",
        "ing",
        "ed",
        "ly",
    ]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(400)]
    words += ["cat", "dog", "red", "a", "the", "video", "image", "fps", "Noise", "Level", "aspect", "ratio", "in"]
    lines = [
        " ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) + rng.choice(["", ".", ":"]) for _ in range(3000)
    ] + [str(i) for i in range(1000)]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        vocab_size=200,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        character_coverage=1.0,
        minloglevel=2,
    )
    (root / "spm").mkdir()
    (root / "spm" / "spiece.model").write_bytes(model.getvalue())
    # from the directory holding spiece.model (transformers 5 ignores T5Tokenizer(vocab_file=...))
    tok = transformers.T5Tokenizer.from_pretrained(str(root / "spm"), extra_ids=0, local_files_only=True)
    assert len(tok) == 200 and tok.pad_token_id == 0 and tok.eos_token_id == 1
    tok.save_pretrained(str(root / "checkpoint"))
    return root / "checkpoint"
