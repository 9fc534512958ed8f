"""Tiny randomly initialised Llama models and LoRA adapters for fast inference tests.

The tokenizer is a byte-level BPE trained in a moment on a few sentences; the model's weights are
drawn with a wide init so its logits are peaked (greedy decoding then has no near-ties for
float noise to flip).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CORPUS = [
    "What is the capital of France? Paris is the capital of France.",
    "The quick brown fox jumps over the lazy dog.",
    "Adapters change how a model answers: a medical note, a legal summary, a poem.",
    "Hello world! Numbers 0 1 2 3 4 5 6 7 8 9 and symbols ,.;:?!-()[]{}",
] * 4
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token="<|im_start|>",
        chat_template=CHAT_TEMPLATE,
    )


def build_tiny_model(path: Path, seed: int = 0, hidden: int = 64, layers: int = 2) -> Path:
    """A saved tiny Llama (config, safetensors, tokenizer) at ``path``."""
    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.2,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def make_adapter(
    base: Path,
    out: Path,
    seed: int,
    rank: int = 4,
    targets: tuple[str, ...] = ("q_proj", "v_proj"),
) -> Path:
    """A LoRA adapter for the model at ``base`` with random (non-zero) weights."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM.from_pretrained(base)
    config = LoraConfig(
        r=rank, lora_alpha=2 * rank, target_modules=list(targets), init_lora_weights=False
    )
    peft_model = get_peft_model(model, config)
    with torch.no_grad():  # weights large enough to change greedy answers
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.3)
    peft_model.save_pretrained(str(out))
    cfg_path = out / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = str(base)
    cfg_path.write_text(json.dumps(cfg))
    return out


def make_adapter_family(
    base: Path, root: Path, count: int, shared: int = 2, noise: float = 0.0005, seed: int = 0
) -> list[Path]:
    """``count`` rank-4 adapters on q_proj and v_proj at ``root/member-<i>`` whose updates lie
    (up to ``noise``) in one ``shared``-dimensional column and row space per module, as a
    compressed collection assumes: each member is a mix of the same few base LoRAs."""
    from safetensors.torch import load_file, save_file

    template = make_adapter(base, root / "member-0", seed=seed, rank=4)
    tensors = load_file(str(template / "adapter_model.safetensors"))
    gen = torch.Generator().manual_seed(seed)
    modules = sorted({k.rsplit(".lora_", 1)[0] for k in tensors})
    spaces = {}
    for m in modules:
        a, b = tensors[f"{m}.lora_A.weight"], tensors[f"{m}.lora_B.weight"]
        spaces[m] = (
            torch.randn(shared, a.shape[1], generator=gen) * 0.3,
            torch.randn(b.shape[0], shared, generator=gen) * 0.3,
        )
    paths = []
    for i in range(count):
        out = root / f"member-{i}"
        if i:
            shutil.copytree(template, out)
        mixed = {}
        for m in modules:
            a0, b0 = spaces[m]
            a, b = tensors[f"{m}.lora_A.weight"], tensors[f"{m}.lora_B.weight"]
            # Scaled so that each factor's entries are as large as make_adapter's.
            mix_a = torch.randn(a.shape[0], shared, generator=gen) / shared**0.5
            mix_b = torch.randn(shared, b.shape[1], generator=gen) / shared**0.5
            mixed[f"{m}.lora_A.weight"] = mix_a @ a0 + noise * torch.randn(a.shape, generator=gen)
            mixed[f"{m}.lora_B.weight"] = b0 @ mix_b + noise * torch.randn(b.shape, generator=gen)
        save_file(mixed, str(out / "adapter_model.safetensors"))
        paths.append(out)
    return paths


def random_lora(out: Path, base_name: str) -> Path:
    """A real LoRA adapter as peft saves it (with the README.md peft adds) at ``out``, on a tiny
    random Llama named ``base_name`` (its ``base_model_name_or_path``); no hub lookup."""
    config = LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    model.name_or_path = base_name  # becomes base_model_name_or_path
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    peft_model.save_pretrained(str(out), save_embedding_layers=False)  # no hub lookup
    return out


WHISPER_LANGUAGES = ("en", "de", "fr")


def build_tiny_whisper(path: Path, seed: int = 0) -> Path:
    """A saved tiny multilingual Whisper (config, weights, generation config, feature extractor,
    tokenizer) at ``path``: a byte-level BPE like ``tiny_tokenizer``'s, then Whisper's special
    tokens and its 1501 timestamp tokens after them, in Whisper's order (the tokenizer and the
    timestamp logic find them by position). Its generations are at most ``max_length`` tokens
    per 30 s window, so a long file stays quick."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (
        GenerationConfig,
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperTokenizerFast,
    )

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(CORPUS, trainer)
    eot = "<|endoftext|>"
    tok.add_special_tokens([eot])
    specials = [
        "<|startoftranscript|>",
        *(f"<|{lang}|>" for lang in WHISPER_LANGUAGES),
        "<|translate|>", "<|transcribe|>", "<|startoflm|>", "<|startofprev|>", "<|nocaptions|>",
        "<|notimestamps|>",
    ]  # fmt: skip
    tokenizer = WhisperTokenizerFast(
        tokenizer_object=tok, unk_token=eot, bos_token=eot, eos_token=eot, pad_token=eot
    )
    tokenizer.add_special_tokens({"additional_special_tokens": specials})
    tokenizer.add_tokens([f"<|{i * 0.02:.2f}|>" for i in range(1501)])
    ids = tokenizer.convert_tokens_to_ids
    torch.manual_seed(seed)
    config = WhisperConfig(
        vocab_size=len(tokenizer), num_mel_bins=80, d_model=16,
        encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=32, decoder_ffn_dim=32, max_source_positions=1500,
        max_target_positions=448, pad_token_id=ids(eot), bos_token_id=ids(eot),
        eos_token_id=ids(eot), decoder_start_token_id=ids("<|startoftranscript|>"),
        begin_suppress_tokens=None, suppress_tokens=None,
    )  # fmt: skip
    model = WhisperForConditionalGeneration(config)
    model.generation_config = GenerationConfig(
        decoder_start_token_id=ids("<|startoftranscript|>"),
        eos_token_id=ids(eot), pad_token_id=ids(eot), bos_token_id=ids(eot),
        no_timestamps_token_id=ids("<|notimestamps|>"),
        prev_sot_token_id=ids("<|startofprev|>"),
        lang_to_id={f"<|{lang}|>": ids(f"<|{lang}|>") for lang in WHISPER_LANGUAGES},
        task_to_id={"transcribe": ids("<|transcribe|>"), "translate": ids("<|translate|>")},
        is_multilingual=True, max_initial_timestamp_index=50, max_length=24,
    )  # fmt: skip
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    WhisperFeatureExtractor(feature_size=80).save_pretrained(path)
    return path
