"""Request and response models of the HTTP API."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

from shared.protocol.limits import MAX_SEED, Fraction, Name, NewTokens, Prompts, Seed, Temperature, TopK
from shared.specs.train import DECAY_STYLES, FINETUNE_METHODS, LORA_TARGETS, OVERLONG
Dtype = Literal["fp32", "fp16", "bf16"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ConvertJob(_Strict):
    """HF checkpoint (uploaded) -> native checkpoint at a TP/PP layout."""
    kind: Literal["convert"]
    source: Name
    output: Name | None = None
    target_tp: int = Field(1, ge=1, le=64)
    target_pp: int = Field(1, ge=1, le=64)
    dtype: Dtype | None = None
    make_vocab_size_divisible_by: int = Field(128, ge=1, le=65536)
    true_vocab_size: int | None = Field(None, ge=1)
    check_parity: bool = Field(True, description="run the converted model against the source and store the parity report")


class ReshardJob(_Strict):
    """Native checkpoint -> native checkpoint at another TP/PP layout."""
    kind: Literal["reshard"]
    source: Name
    output: Name | None = None
    target_tp: int = Field(1, ge=1, le=64)
    target_pp: int = Field(1, ge=1, le=64)
    dtype: Dtype | None = None
    check_parity: bool = True


class ExportJob(_Strict):
    """Native checkpoint -> HF checkpoint."""
    kind: Literal["export"]
    source: Name
    output: Name | None = None
    dtype: Dtype | None = None
    check_parity: bool = True


Record = dict[str, Any]
_UNSET = "default: the trainer's (see `python -m services.train --help`)"


def _opt(ge=None, le=None, gt=None, lt=None, description: str = _UNSET):
    return Field(None, ge=ge, le=le, gt=gt, lt=lt, description=description)


class FinetuneConfig(_Strict):
    """Training settings of a finetune job (Megatron's names). A job names no host path: its data
    is inline (`data`) or a dataset uploaded with `POST /v1/datasets` (`dataset`); its metrics are
    served by `GET /v1/jobs/{id}/metrics`. Unset fields take the trainer's defaults."""
    train_iters: int = Field(ge=1, le=1_000_000)
    data: list[Record] | None = Field(None, min_length=1, description="inline records: {text}, {prompt, completion} "
                                                                      "or {messages}")
    dataset: Name | None = Field(None, description="a dataset uploaded with POST /v1/datasets")
    valid_data: list[Record] | None = Field(None, min_length=1)
    valid_dataset: Name | None = None
    micro_batch_size: int | None = _opt(1, 4096)
    global_batch_size: int | None = _opt(1, 1 << 20)
    seq_length: int | None = _opt(1, 1 << 20, description="at most the model's max_position_embeddings")
    lr: float | None = _opt(0, 10)
    min_lr: float | None = _opt(0, 10)
    lr_warmup_iters: int | None = _opt(0, 1_000_000)
    lr_decay_iters: int | None = _opt(1, 1_000_000)
    lr_decay_style: Literal[DECAY_STYLES] | None = None  # type: ignore[valid-type]
    weight_decay: float | None = _opt(0, 10)
    clip_grad: float | None = _opt(0, 1e6)
    adam_beta1: float | None = _opt(0, lt=1)
    adam_beta2: float | None = _opt(0, lt=1)
    adam_eps: float | None = _opt(gt=0, le=1)
    seed: int | None = _opt(0, MAX_SEED)
    tensor_model_parallel_size: int | None = _opt(1, 64)
    pipeline_model_parallel_size: int | None = _opt(1, 64)
    world_size: int | None = _opt(1, 1024, description="processes (default TP x PP); at most what a worker offers")
    bf16: bool | None = None
    save_interval: int | None = _opt(1, 1_000_000)
    eval_interval: int | None = _opt(1, 1_000_000)
    eval_iters: int | None = _opt(1, 100_000)
    valid_fraction: float | None = _opt(0, lt=1)
    overlong: Literal[OVERLONG] | None = None  # type: ignore[valid-type]
    recompute_activations: bool | None = None
    finetune_method: Literal[FINETUNE_METHODS] | None = None  # type: ignore[valid-type]
    lora_rank: int | None = _opt(1, 4096)
    lora_alpha: float | None = _opt(gt=0, le=1e6)
    lora_dropout: float | None = _opt(0, lt=1)
    lora_targets: list[Literal[LORA_TARGETS]] | None = Field(None, min_length=1,  # type: ignore[valid-type]
                                                              max_length=len(LORA_TARGETS))
    export_hf: bool | None = None
    make_vocab_size_divisible_by: int | None = _opt(1, 65536)

    @model_validator(mode="after")
    def _one_source_of_data(self):
        if (self.data is None) == (self.dataset is None):
            raise ValueError("give the training data either inline as `data` or as an uploaded `dataset`, not both")
        if self.valid_data is not None and self.valid_dataset is not None:
            raise ValueError("give validation data as `valid_data` or `valid_dataset`, not both")
        return self

    def trainer_options(self) -> dict[str, Any]:
        """The TrainConfig fields that were set (data and datasets are the service's to place)."""
        return self.model_dump(exclude_none=True, exclude={"data", "dataset", "valid_data", "valid_dataset"})


class ImportJob(_Strict):
    """An HF checkpoint (or a JSONL dataset) into the store without passing through the gateway:
    a finished direct upload (`POST /v1/checkpoints/uploads/{id}/complete` or
    `/v1/datasets/uploads/{id}/complete` submits this), or a copy of an S3 prefix (a checkpoint
    directory) or object (a dataset) the team was granted (`LLAMA_SVC_IMPORT_GRANTS`)."""
    kind: Literal["import"]
    output: Name
    target: Literal["checkpoint", "dataset"] = "checkpoint"
    upload: Annotated[str, Field(pattern=r"^[0-9a-f]{24}$")] | None = None
    uri: Annotated[str, Field(pattern=r"^s3://[a-z0-9][a-z0-9.\-]{1,62}/[A-Za-z0-9._\-/]*$", max_length=1024,
                              description="s3://bucket/prefix/ of an HF checkpoint directory")] | None = None

    @model_validator(mode="after")
    def _one_source(self):
        if (self.upload is None) == (self.uri is None):
            raise ValueError("name exactly one of `upload` (a completed direct upload) or `uri` (a granted S3 prefix)")
        return self


class FinetuneJob(_Strict):
    kind: Literal["finetune"]
    source: Name
    output: Name | None = None
    config: FinetuneConfig


class EvalJob(_Strict):
    """The seed's parity table: lm-eval tasks on a checkpoint and on an uploaded HF reference."""
    kind: Literal["eval"]
    source: Name
    reference: Name = Field(description="an uploaded HF checkpoint to compare against")
    tasks: list[Annotated[str, Field(pattern=r"^[a-z0-9_]{1,64}$")]] = Field(
        ["all"], min_length=1, max_length=16, description="bundled task names, or ['all']")
    dtype: list[Literal["fp32", "bf16"]] = Field(["fp32"], min_length=1, max_length=2)
    limit: int | None = Field(None, ge=1, le=100000, description="items per task")


class GenerateJob(_Strict):
    """Batch generation; results are kept in the job record."""
    kind: Literal["generate"]
    model: Name
    prompts: Prompts
    # without logprobs a job must generate (Megatron: tokens_to_generate=0 implies logprobs)
    tokens_to_generate: Annotated[NewTokens, Field(ge=1)] = 64
    temperature: Temperature = 1.0
    top_k: TopK = 0
    top_p: Fraction = 0.0
    random_seed: Seed | None = None


JobRequest = Annotated[Union[ConvertJob, ReshardJob, ExportJob, ImportJob, FinetuneJob, EvalJob, GenerateJob],
                       Field(discriminator="kind")]


class _Open(BaseModel):
    """A record the workers write: the declared fields, and any others they add kept as they are."""
    model_config = ConfigDict(extra="allow")


class Progress(_Open):
    phase: str | None = Field(None, description="e.g. fetch, convert, parity, upload, train, eval, generate")
    current: int | float | None = None
    total: int | float | None = None
    unit: str | None = Field(None, description="what current and total count: bytes, steps, prompts, reports...")
    eta_s: float | None = Field(None, description="seconds left, from the rate so far")
    ts: float | None = Field(None, description="when the worker reported it")
    step: int | None = None
    loss: float | None = None


class ConvertResult(_Open):
    """convert, reshard and export: the checkpoint written."""
    checkpoint: str
    format: str | None = None
    tp: int | None = None
    pp: int | None = None
    dtype: str | None = None
    files: int
    bytes: int


class ImportResult(ConvertResult):
    """import: the HF checkpoint registered."""


class FinetuneResult(_Open):
    checkpoint: str
    files: int
    status: str | None = None
    iteration: int | None = None
    loss: float | None = None
    valid_loss: float | None = None
    trainable_parameters: int | None = None
    parameters: int | None = None
    elapsed_s: float | None = None


class EvalResult(_Open):
    passed: bool
    reports: list[dict[str, Any]]


class GenerateResult(_Open):
    text: list[str]


RESULT_OF = {"convert": ConvertResult, "reshard": ConvertResult, "export": ConvertResult, "import": ImportResult,
             "finetune": FinetuneResult, "eval": EvalResult, "generate": GenerateResult}
JobResult = Union[ConvertResult, ImportResult, FinetuneResult, EvalResult, GenerateResult]


class JobOut(BaseModel):
    id: str
    kind: str
    state: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    params: dict[str, Any]
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    attempts: int
    max_attempts: int
    cancel_requested: bool
    progress: Progress | None = None
    result: JobResult | None = Field(None, description="by kind: ConvertResult for convert, reshard and export, "
                                     "ImportResult, FinetuneResult, EvalResult or GenerateResult")
    error: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _result_of_kind(cls, data: Any) -> Any:
        """Each kind's result as its own model (they are not tagged, so the union alone could pick another)."""
        model = RESULT_OF.get(data.get("kind")) if isinstance(data, dict) else None
        if model is not None and isinstance(data.get("result"), dict):
            data = {**data, "result": model.model_validate(data["result"])}
        return data


class JobList(BaseModel):
    jobs: list[JobOut]
    next_cursor: int | None = Field(None, description="pass as `cursor` for the next (older) page")


class JobEvent(BaseModel):
    model_config = ConfigDict(extra="allow")
    seq: int
    ts: float
    type: str


class EventList(BaseModel):
    events: list[JobEvent]
    state: str


class _Open(BaseModel):
    """A stored record: the fields listed here, and whatever else its writer recorded."""
    model_config = ConfigDict(extra="allow")


class StoredFile(_Open):
    size: int
    sha256: str


class LayoutOut(_Open):
    tp: int
    pp: int
    divisible_by: int | None = None
    stages: list[list[int]] | None = Field(None, description="[first, end) layers of each pipeline stage")
    vocab_size: int | None = None
    padded_vocab_size: int | None = None
    rank_files: dict[str, str] | None = Field(None, description='"tp,pp" -> file of that rank')


class ParityOut(_Open):
    """The stored parity report (see the README's Convert section); ``passed`` null: not run."""
    passed: bool | None = None
    max_abs_logit_diff: float | None = None
    max_abs_logprob_diff: float | None = None
    top1_agreement: float | None = None
    tolerance: float | None = None
    tp: int | None = None
    pp: int | None = None
    divergence: dict[str, Any] | None = Field(None, description="the first layer and sublayer over its tolerance")
    layers: list[dict[str, Any]] | None = Field(None, description="max |Δhidden| after attention and MLP, per layer")


class ProvenanceOut(_Open):
    converter: str | None = None
    command: str | None = None
    source: dict[str, Any] | None = Field(None, description="format, checkpoint name, dtype, sha256 of every file")


class CheckpointOut(BaseModel):
    name: str
    format: str | None = None
    committed_at: float
    bytes: int
    files: dict[str, StoredFile]
    layout: LayoutOut | None = None
    dtype: str | None = None
    model: dict[str, Any] | None = None
    parity: ParityOut | None = None
    provenance: ProvenanceOut | None = None
    service: dict[str, Any] | None = None


class CheckpointList(BaseModel):
    checkpoints: list[CheckpointOut]


class DeclaredFileIn(_Strict):
    path: str = Field(max_length=1024, description="relative path in the checkpoint directory")
    size: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class DirectUploadRequest(_Strict):
    name: Name
    files: list[DeclaredFileIn] = Field(min_length=1, max_length=10_000)


class DatasetUploadRequest(_Strict):
    name: Name
    size: int = Field(ge=1)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class DirectUploadFile(BaseModel):
    path: str
    size: int
    part_size: int = Field(description="split the file into parts of this many bytes (the last may be shorter)")
    urls: list[str] = Field(description="PUT each part's bytes to its URL, in order; no Authorization header")


class DirectUploadOut(BaseModel):
    upload_id: str
    name: str
    expires_at: float
    files: list[DirectUploadFile]


class DatasetOut(BaseModel):
    name: str
    committed_at: float
    bytes: int
    records: int
    sha256: str


class DatasetList(BaseModel):
    datasets: list[DatasetOut]


class JobMetrics(BaseModel):
    job_id: str
    metrics: list[dict[str, Any]] = Field(description="one entry per training step and evaluation, as written")
