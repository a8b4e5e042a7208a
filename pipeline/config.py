"""The job spec: YAML in, validated pydantic models out, before any cluster work starts.

Every field has a default that works on a laptop; unknown keys are errors (a typo
must not silently fall back to a default), and each error names the dotted key,
what was given, and what is allowed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)


class Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SourceSpec(Spec):
    uri: str | list[str] = Field(
        description="Where the shards are: any fsspec URI, directory or glob (s3://b/p/*.tar, file://...), or a list.")
    format: Literal["webdataset", "images", "parquet"] = Field(
        "webdataset", description="webdataset: .tar shards; images: a folder of image files; parquet: a column of image bytes.")
    image_column: str = Field("image", description="parquet: the column holding encoded image bytes.")
    label_column: str | None = Field(None, description="parquet: an optional integer ground-truth label column.")
    key_column: str | None = Field(None, description="parquet: the column with record keys (else file name + row number).")
    images_per_shard: int = Field(256, ge=1, description="images: how many files make one shard.")
    requests_in_flight: int = Field(
        32, ge=1, le=1024, description="images, and parquet rows whose image is a path (Hugging Face datasets): "
                                       "files one read actor fetches at once from an object store (each GET "
                                       "waits tens of ms there); 1 fetches one at a time. Local disk reads one "
                                       "at a time whatever this says. Also the sub-folders of source.uri the "
                                       "driver lists at once on an object store.")
    label_from: Literal["none", "folder"] = Field(
        "none", description="images: folder takes each image's label from its class folder (CLASS/NAME.JPEG, as "
                            "ImageNet and torchvision's ImageFolder lay it out), mapped to the model's label names "
                            "or class indices; names that map to nothing are counted in the report.")
    records_per_part: int = Field(
        1024, ge=1, description="A shard with more records is cut into parts of this many: a part is the unit "
                                "of work (read, decoded, run and written by one actor) and one Parquet file.")
    only_keys: str | None = Field(None, description="A file (URI) of record keys, one per line: read only those "
                                                    "(what `vitpipe errors --retry-spec` writes).")

    @model_validator(mode="after")
    def _folder_labels_need_images(self) -> SourceSpec:
        if self.label_from == "folder" and self.format != "images":
            raise ValueError("source.label_from folder reads labels from image folders: it needs format images "
                             "(webdataset shards carry .cls or .json labels; parquet a label_column)")
        return self

    @property
    def uris(self) -> list[str]:
        """source.uri as a list, whether the spec gives one URI or several."""
        return self.uri if isinstance(self.uri, list) else [self.uri]


class ModelSpec(Spec):
    checkpoint: str | None = Field(
        "builtin:digits",
        description="A checkpoint of the paper's ViT, DeiT, CLIP, SigLIP or DINOv2: a Hugging Face directory "
                    "(ViTModel, DeiT, CLIPModel, CLIPVisionModelWithProjection, SiglipModel, SiglipVisionModel, "
                    "Dinov2Model, Dinov2WithRegistersModel), an open_clip directory, an OpenAI CLIP, timm or "
                    "DINOv2 .pth/.bin/.safetensors, a JAX or big_vision .npz, a vitpipe .safetensors, "
                    "hf://ORG/NAME[@REV][/FILE], or builtin:digits; null for random weights of `arch`.")
    arch: str | None = Field(None, description="Random weights (checkpoint null): vit_{ti,s,b,l,h}_{8,14,16,32}, or a "
                                               "family's real sizes: clip_b_32, clip_b_16, clip_l_14, siglip_b_16, "
                                               "siglip_so400m_14, dinov2_{s,b,l,g}_14, dinov2_l_14_reg, "
                                               "deit_{s,b}_16_distilled.")
    pooling: Literal["cls", "gap", "cls+gap", "map"] | None = Field(
        None, description="The embedding: cls (the class token), gap (the mean of the patch tokens), cls+gap (both "
                          "concatenated: DINOv2's linear-probe convention), map (SigLIP's attention-pooling head); "
                          "default: the checkpoint's. A head keeps what it was trained on.")
    image_size: int | None = Field(None, ge=16, description="Input size; position embeddings are interpolated if it differs.")
    num_classes: int | None = Field(None, ge=0, description="Random weights only: head size.")
    heads: int | None = Field(None, ge=1, description="timm files only: attention heads (not stored in the "
                                                     "weights); default: the arch's, else width / 64.")
    labels: str | None = Field(None, description="A text file (one class name per line) or JSON list URI; "
                                                 "default: the checkpoint's label names.")
    class_names: list[str | dict[str, list[str] | str]] | str | None = Field(
        None, description="Zero-shot labels from names, through a CLIP or SigLIP checkpoint's own text tower and "
                          "tokenizer (a CLIPModel, SiglipModel or open_clip directory): a list of names, or a text file URI with "
                          "one name per line. A list entry may be {name: [prompts]}: its own prompts (or templates "
                          "with {}) instead of model.prompts. The top-k labels are these names; scores are CLIP's "
                          "softmax or SigLIP's per-class sigmoid (report and manifest say which). Not with a trained "
                          "head, model.labels or model.pooling.")
    prompts: list[str] | str = Field(
        "imagenet80", description="With model.class_names: the prompt templates, each with {} for the name: a named "
                                  "set (imagenet80: the CLIP paper's 80 ImageNet templates; short: its 7 chosen ones; "
                                  "photo: 'a photo of a {}.'), a list, or a text file URI with one template per line. "
                                  "A name's embedding is the normalized mean of its normalized prompt embeddings.")
    mean: tuple[float, float, float] | None = Field(None, description="Normalization mean; default: the checkpoint's.")
    std: tuple[float, float, float] | None = Field(None, description="Normalization std; default: the checkpoint's.")

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, v: str | None) -> str | None:
        from pipeline.model.vit import ALL_ARCH_NAMES

        if v is not None and v not in ALL_ARCH_NAMES:
            raise ValueError(f"unknown arch {v!r}; allowed: {', '.join(ALL_ARCH_NAMES)}")
        return v

    @model_validator(mode="after")
    def _arch_or_checkpoint(self) -> ModelSpec:
        if self.checkpoint is None and self.arch is None:
            raise ValueError("set model.checkpoint, or model.arch for random weights")
        return self

    @model_validator(mode="after")
    def _class_names(self) -> ModelSpec:
        """Inline names and templates are checked here, before any cluster work (files at load)."""
        from pipeline import zeroshot

        if self.class_names is None:
            return self
        for key in ("labels", "num_classes", "pooling"):
            if getattr(self, key) is not None:
                raise ValueError(f"model.class_names labels from names: model.{key} cannot be given with it")
        if self.checkpoint is None:
            raise ValueError("model.class_names needs a CLIP or SigLIP checkpoint with its text tower, not random weights")
        if isinstance(self.class_names, list):
            zeroshot.check_names(self.class_names)
        if isinstance(self.prompts, list):
            zeroshot.check_templates(self.prompts)
        return self


class GateSpec(Spec):
    enabled: bool = Field(True, description="Check non-fp32 or compiled engines against torch fp32 before the bulk run.")
    samples: int = Field(64, ge=1, description="Calibration images taken from the job's own first shard.")
    min_cosine: float = Field(0.999, ge=-1, le=1, description="Least mean embedding cosine to torch fp32.")
    min_top1: float = Field(0.99, ge=0, le=1, description="Least top-1 agreement with torch fp32.")
    placement: Literal["auto", "first", "driver", "actors"] = Field(
        "auto", description="Where the check runs. first: one Ray task with the actors' resources builds, caches "
                            "and checks the engine before any actor starts; driver: a thread of the driver while "
                            "the actors start (CPU engines only); actors: every model actor checks its own engine "
                            "before its first row. auto: actors for a torch engine on GPUs, driver for a torch "
                            "engine on CPUs, first for engines with a build to cache (ONNX, TensorRT, int8/fp8, "
                            "torch.compile). No row is written before a check passes, wherever it runs.")


class EngineSpec(Spec):
    backend: Literal["auto", "torch", "onnx", "tensorrt"] = Field(
        "torch", description="auto: TensorRT on a GPU when installed, else torch CUDA, else the fastest CPU engine.")
    precision: Literal["fp32", "bf16", "fp16", "int8", "fp8"] = Field(
        "fp32", description="Compute precision. fp16 needs a GPU; int8 (backend onnx or tensorrt) and fp8 "
                            "(tensorrt, compute capability >= 8.9) are calibrated on the job's own images first, "
                            "then gated like the others.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda when the actor has a GPU, else cpu.")
    batch_size: int | None = Field(
        None, ge=1, le=4096, description="Images per engine call (and TensorRT's max batch); default 256 on a "
                                         "GPU, and on a CPU what keeps a call's activations near 40 MB (ViT-Ti/16 "
                                         "at 224 px: 32; ViT-B/16: 16; the demo model: 256). Fixed for the run: "
                                         "nothing is tuned on the job's first images, so they are as fast as the rest.")
    decode: Literal["auto", "cpu", "gpu"] = Field(
        "auto", description="Where JPEGs are decoded when the model runs on a GPU. gpu: batched nvJPEG in the "
                            "model actor (needs torchvision on the GPU nodes), other formats and what nvJPEG "
                            "refuses fall back to the CPU record by record; cpu: decode actors on the CPUs. "
                            "auto: gpu where the model actors have a GPU, else cpu (inside the model actor).")
    compile: bool = Field(False, description="torch backend: torch.compile the model.")
    calibration_samples: int = Field(
        128, ge=1, description="int8: images from the job's first shards that set the activation ranges "
                               "(the gate checks on the images after them).")
    cache_uri: str | None = Field(
        None, description="Compiled-engine cache (local folder or fsspec URI); default ~/.cache/vitpipe/engines.")
    gate: GateSpec = GateSpec()

    @model_validator(mode="after")
    def _quantized_backend(self) -> EngineSpec:
        if self.precision == "int8" and self.backend == "torch":
            raise ValueError("engine.precision int8 runs on backend onnx or tensorrt (or auto), not torch")
        if self.precision == "fp8" and self.backend not in ("tensorrt", "auto"):
            raise ValueError("engine.precision fp8 runs only on backend tensorrt (or auto), on a GPU of compute "
                             "capability 8.9 or newer")
        return self


class OutputsSpec(Spec):
    top_k: int = Field(5, ge=0, description="How many classes to keep per image (0: none).")
    embeddings: bool = Field(True, description="Write the pooled embedding per image.")
    embedding_dtype: Literal["float32", "float16"] = Field("float32", description="Storage type of `embedding`.")
    normalize: Literal["auto"] | bool = Field(
        "auto", description="L2-normalize each embedding (unit length, so a dot product is the cosine). auto: true "
                            "for the contrastive towers (CLIP, SigLIP), whose embeddings are compared by cosine, "
                            "false for the others (ViT, DeiT, DINOv2). The manifest records the choice.")

    def normalizes(self, family: str) -> bool:
        """outputs.normalize for a model of this family (vit.ViTConfig.family)."""
        return family in ("clip", "siglip") if self.normalize == "auto" else bool(self.normalize)


class OutputSpec(Spec):
    uri: str = Field(description="The output dataset directory (any fsspec URI).")
    mode: Literal["error", "full", "incremental"] = Field(
        "error", description="error: refuse an output that holds a finished run; full: reprocess every shard and "
                             "replace the output; incremental: only shards new, changed, or done with another model.")
    row_group_rows: int = Field(16_384, ge=1, description="Rows per Parquet row group (one file per shard and kind).")
    lease_ttl_s: float = Field(120.0, gt=0, description="The output lease's lifetime; renewed every third of it "
                                                         "while the run lives, taken over after it by a later run.")
    requests_in_flight: int = Field(
        32, ge=1, le=1024, description="An output on an object store: ledger entries the driver reads or writes, "
                                       "and part files it moves at commit, at once (each request waits tens of ms "
                                       "there); 1 does one at a time. Local disk does one at a time whatever this "
                                       "says.")
    samples: bool = Field(
        True, description="Keep the run page's sample (OUT/_samples/: at most 36 thumbnails of 96 px and 32 "
                          "embeddings per part, made by the model actors; pipeline/samples.py). false: no image "
                          "leaves the job as a thumbnail, and the page shows counts, errors and throughput only.")


class ResourcesSpec(Spec):
    actors: int | None = Field(None, ge=1, description="Model actors; default: as many as the cluster's CPUs/GPUs allow.")
    cpus_per_actor: float = Field(1.0, gt=0, description="CPUs each model actor reserves (and torch threads it uses).")
    gpus_per_actor: float = Field(0.0, ge=0, description="GPUs each model actor reserves.")
    read_cpus: float = Field(
        0.0, ge=0, description="CPUs each read actor reserves. 0: reads are I/O-bound and a part costs far less to "
                               "read than to decode and run; with a share reserved, two readers placed on one node "
                               "left its model actor no room (seen on a 3-node cluster).")
    readers: int | None = Field(
        None, ge=1, validation_alias=AliasChoices("readers", "max_shards_in_flight"),
        description="Read actors (each reads one shard at a time, a part ahead); default one per model actor "
                    "on CPUs, four per GPU actor decoding on its GPU, and one per three decode actors with "
                    "decode: cpu. (Also accepted under its old name, max_shards_in_flight.)")
    decode_actors: int | None = Field(
        None, ge=0, description="Decode actors (1 CPU each) between the readers and the model actors. Default: 0 "
                                "(decoding runs inside each model actor: on its GPU with engine.decode gpu, else on "
                                "its threads); with GPUs and engine.decode cpu, the CPUs the model and read actors "
                                "leave free.")
    buffer_mb_per_actor: int = Field(
        512, ge=16, description="Object-store memory the run may hold in flight (shards read ahead, results not "
                                "yet written), per model actor: keeps memory flat however large the input.")


class RayOptions(Spec):
    address: str | None = Field(None, description="An existing cluster (ray://... or auto); default: a local Ray.")
    progress: bool = Field(True, description="Show a line per start-up step, then a progress bar, on stderr.")
    verbose: bool = Field(False, description="Show Ray's own log lines and worker output (quiet by default: "
                                             "only vitpipe's start-up lines, progress bar, report and errors).")
    stall_timeout_s: float = Field(1800.0, gt=0, description="Fail loudly if no row arrives for this long "
                                                              "(a stuck read or model call), instead of hanging.")


class AnalyzeSpec(Spec):
    samples: int = Field(16, ge=0, le=256, description="`vitpipe analyze`: images (the first decodable ones "
                                                      "listed) whose attention rollout is drawn.")
    knn_k: int = Field(5, ge=1, description="`vitpipe analyze`: neighbours in the class token vs mean-of-patches "
                                            "k-nearest-neighbour comparison (cosine, similarity-weighted vote).")
    knn_holdout: float = Field(0.2, gt=0, lt=1, description="`vitpipe analyze`: share of labeled images held out "
                                                            "as the kNN test split (chosen by a hash of the key).")
    knn_max_images: int = Field(20_000, ge=10, description="`vitpipe analyze`: labeled images the kNN comparison "
                                                           "reads back at most (the first part files' labeled "
                                                           "images, by file name).")


class JobSpec(Spec):
    name: str = Field("vitpipe-job", description="A name for reports and logs.")
    source: SourceSpec
    model: ModelSpec = ModelSpec()
    engine: EngineSpec = EngineSpec()
    outputs: OutputsSpec = OutputsSpec()
    output: OutputSpec
    resources: ResourcesSpec = ResourcesSpec()
    ray: RayOptions = RayOptions()
    analyze: AnalyzeSpec = AnalyzeSpec()


class JobSpecError(ValueError):
    """A job spec that would fail: raised before any Ray work, with every problem named."""


def load_job_spec(path: str | Path | None = None, overrides: list[str] | None = None,
                  data: dict[str, Any] | None = None) -> JobSpec:
    """YAML file (or a dict) + `key.path=value` overrides -> a validated JobSpec."""
    where = str(path) if path else "job spec"
    if data is None:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise JobSpecError(f"{where}: no such file") from None
        except yaml.YAMLError as e:
            raise JobSpecError(f"{where}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise JobSpecError(f"{where}: the top level must be a mapping of sections (source, model, ...)")
    for item in overrides or []:
        apply_override(data, item)
    try:
        spec = JobSpec.model_validate(data)
    except ValidationError as e:
        raise JobSpecError(format_errors(where, e)) from None
    return absolute_paths(spec)


def absolute_paths(spec: JobSpec) -> JobSpec:
    """Local paths in a spec, relative to where vitpipe was started: made absolute here, since Ray's
    workers do not share the driver's working directory."""
    def fix(uri: str) -> str:
        return uri if "://" in uri or uri.startswith(("/", "builtin:", "hf:")) else os.path.abspath(uri)

    src = spec.source
    src.uri = [fix(u) for u in src.uri] if isinstance(src.uri, list) else fix(src.uri)
    spec.output.uri = fix(spec.output.uri)
    from pipeline.zeroshot import is_template_set

    m = spec.model  # the label set's files are read by every model actor too
    if isinstance(m.class_names, str):
        m.class_names = fix(m.class_names)
    if isinstance(m.prompts, str) and not is_template_set(m.prompts):
        m.prompts = fix(m.prompts)
    return spec


def apply_override(data: dict[str, Any], item: str) -> None:
    """`engine.batch_size=64` -> data["engine"]["batch_size"] = 64 (value parsed as YAML)."""
    if "=" not in item:
        raise JobSpecError(f"--set {item!r}: expected key.path=value, e.g. engine.batch_size=64")
    key, raw = item.split("=", 1)
    node = data
    parts = key.strip().split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise JobSpecError(f"--set {item!r}: {p!r} is not a section")
    node[parts[-1]] = yaml.safe_load(raw) if raw != "" else None


def format_errors(where: str, e: ValidationError) -> str:
    lines = [f"{where}: {e.error_count()} problem(s) in the job spec:"]
    for err in e.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            lines.append(f"  - {key}: unknown key (check the spelling; see `vitpipe run --help` for the spec reference)")
            continue
        got = f" (got {err['input']!r})" if err["type"] not in ("missing",) and not isinstance(err["input"], dict) else ""
        msg = err["msg"].removeprefix("Value error, ")
        lines.append(f"  - {key}: {msg}{got}")
    return "\n".join(lines)


def describe_spec() -> str:
    """A plain-text reference of every field, for --help and the README."""
    out = []

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, f in model.model_fields.items():
            ann = f.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                walk(ann, f"{prefix}{name}.")
                continue
            default = "required" if f.is_required() else f"default {f.default!r}"
            out.append(f"  {prefix}{name}: {f.description or ''} [{default}]")

    walk(JobSpec, "")
    return "\n".join(out)
