"""Typed recipe configs: the schema of a recipe, on top of the library packages.

A recipe is a YAML file whose sections map one-to-one onto the dataclasses below (or the library's own configs,
e.g. the classifier track's `train`/`kd`/`student`, defined in distill/classifier.py). Names a section may take
(divergences, formats) come from the library's registries, so the library packages never import this module. The CLI
loads the defaults, then the recipe (`--config`), then `key=value` overrides
(`distill.steps=200`). Unknown keys are an error with a suggestion, never silently ignored.
The resolved config is written next to every run as `config.yaml`.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from edgestill.audit.lm import PerturbConfig, check_perturb_config
from edgestill.audit.onion import OnionConfig, check_onion_config
from edgestill.audit.scrub import ScrubConfig
from edgestill.data.images import ImageDataConfig
from edgestill.data.timeseries import SeriesDataConfig
from edgestill.data.views import LowLightConfig
from edgestill.distill.budget import TrainBudget
from edgestill.distill.classifier import FinePruneConfig, KDConfig, TrainConfig, check_fine_prune_config
from edgestill.distill.classifier import StudentConfig as EncoderStudentConfig
from edgestill.distill.edgevl import Stage1Config, Stage2Config, TeacherFitConfig
from edgestill.distill.losses import LOGIT_LOSS_KINDS
from edgestill.distill.multi_teacher import WEIGHTINGS
from edgestill.distill.online import OnlineKDConfig, TrainSchedule
from edgestill.distill.soup import SoupConfig
from edgestill.errors import EdgestillError
from edgestill.models.sequence import SeriesStudentConfig, SeriesTeacherConfig
from edgestill.models.vision import PROMPT, ImageTowerConfig
from edgestill.quant.formats import format_names


@dataclass
class TeacherConfig:
    # "smollm2-135m" (the embedded default), a Hugging Face model folder, or a .gguf file.
    model: str = "smollm2-135m"
    # More teachers sharing `model`'s tokenizer (HF folders or .gguf files): the student learns from all of
    # them, mixed per token by distill.teacher_weighting (MTAKD, distill/multi_teacher.py). `model` stays the
    # teacher the student is sliced from and evaluated against.
    extra: list[str] = field(default_factory=list)
    # Correct `model` on the training split before compressing it (Minitron; distill/correct.py): the student is
    # sliced from, distilled from and measured against the corrected teacher, and the original's numbers stand
    # beside it. Cached and shared by runs with the same teacher, data and settings. false: use `model` as it is.
    correct: bool = True
    correct_steps: int = 50  # at most (early stopping on the validation split)
    correct_batch_size: int = 4
    correct_lr: float = 5e-5
    correct_eval_every: int = 10
    correct_patience: int = 2
    correct_select: str = "val_loss"  # the corrected teacher: val_loss = its best validation state; last = the final step

    def correction(self):
        """The library's CorrectConfig of these keys, or None when teacher.correct is false."""
        from edgestill.distill.correct import CorrectConfig

        if not self.correct:
            return None
        return CorrectConfig(steps=self.correct_steps, batch_size=self.correct_batch_size, lr=self.correct_lr,
                             eval_every=self.correct_eval_every, patience=self.correct_patience,
                             select=self.correct_select)


@dataclass
class DataConfig:
    # "shakespeare" (the embedded default), a folder of .txt/.md files, a .jsonl file with a
    # text field, a single .txt/.md file, or a HF `datasets` folder saved with save_to_disk.
    path: str = "shakespeare"
    text_field: str = "text"
    seq_len: int = 256
    # Splits are made by document (a play, a file, a JSONL record): no document is in two splits.
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    split_seed: int = 0
    # Tokens of the train split whose teacher top-k logits are cached and trained on.
    max_train_tokens: int = 51200
    # Held-out tokens used for perplexity/agreement (the test split).
    max_eval_tokens: int = 12288
    max_val_tokens: int = 4096


@dataclass
class StudentConfig:
    # Depth: number of teacher layers kept; `layers` pins them explicitly.
    num_layers: int = 15
    layers: list[int] | None = None
    # How layers are picked when `layers` is not given:
    #   block_influence - ShortGPT's measure (1 - cos(h_in, h_out)) on calibration text; keep the most influential
    #   uniform         - evenly spaced, first and last always kept
    layer_selection: str = "block_influence"
    # Width; None keeps the teacher's. intermediate_size: FFN units per layer. hidden_size: embedding (residual)
    # channels. num_attention_heads / num_key_value_heads: query heads and KV heads per layer (head_dim is kept;
    # heads must be a multiple of KV heads): KV heads unset keeps the teacher's and drops query heads in every
    # group, heads unset keeps the teacher's heads per KV head and drops whole groups (models/width.py).
    intermediate_size: int | None = None
    hidden_size: int | None = None
    num_attention_heads: int | None = None
    num_key_value_heads: int | None = None
    # How width units are ranked (Minitron width pruning, models/width.py):
    #   activation - their activations on calibration text (Minitron)
    #   weight     - their weight norms (what an FFN-only cut has always used)
    #   auto       - activation (an FFN-only cut used weight norms before; docs/distillation.md#one-lever-at-a-time)
    width_importance: str = "auto"
    # Vocabulary trimming (models/vocab.py): keep only the tokens the training split uses, plus the tokenizer's byte
    # symbols and special tokens, so any text still encodes (a word the student lacks is spelled in kept pieces). The
    # tied embedding loses its other rows; the GGUF carries the trimmed tokenizer. Byte-level BPE tokenizers only.
    trim_vocab: bool = False
    # Low-rank blocks (method [7], models/lowrank.py): every Linear of the kept decoder blocks becomes two smaller
    # matrices U·V initialised from its truncated SVD, with ranks chosen over all of them (greedy on singular-value
    # energy per stored parameter) so that the blocks' matrices store this fraction of their dense parameters, e.g.
    # 0.5. The embedding/head is not factorized. The student runs in PyTorch and ONNX (two smaller MatMuls per
    # projection); llama.cpp's graph has one matrix per projection, so it has no GGUF. null: dense blocks.
    low_rank: float | None = None
    # Existing student model folder (for `edgestill distill`), used instead of slicing the teacher.
    model: str | None = None


@dataclass
class DistillConfig:
    steps: int = 100
    # A training budget instead of `steps` (distill/budget.py): wall-clock time of the distillation loop ("2h", "45m")
    # or training tokens ("2Mtok", "500k tokens"). A time budget is measured on this machine's first steps; the steps
    # it buys are written to RUN/budget.json (and `distill.steps=<those>` repeats the run anywhere). null: `steps`.
    budget: str | None = None
    batch_size: int = 4  # global batch (sequences per optimizer step), split across DDP ranks
    lr: float = 5e-4
    weight_decay: float = 0.0
    warmup_steps: int = 10
    # Loss = alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(labels, student)
    alpha: float = 0.9
    temperature: float = 1.0
    top_k: int = 32  # teacher logits cached per position
    cache_teacher: bool = True  # False: recompute the teacher every step (slower; for comparison)
    freeze_embeddings: bool = True  # keep the teacher's (tied) embedding/head fixed: faster, less overfitting
    grad_clip: float = 1.0
    checkpoint_every: int = 20
    eval_every: int = 25
    # Block-wise first stage (distill/blockwise.py), for a student sliced out of the teacher: this many steps in which
    # each kept block learns, from the teacher's own stream, to do the work of the teacher blocks cut around it; then
    # `steps` of end-to-end KD. Same batch size and lr; not counted by `budget`. 0: none.
    blockwise_steps: int = 0
    # Which evaluated state the run keeps (the student as cut, step 0, is one): val_kl = lowest held-out
    # KL(teacher || student) (fidelity first), val_loss = lowest held-out CE, last = the final step.
    select: str = "val_kl"
    seed: int = 0
    # fp32, or bf16: the student's forward pass under torch.autocast(bfloat16) (weights, gradients' accumulation and
    # the optimizer stay fp32; the losses are computed in fp32). Faster where the CPU has bf16 matmuls (AMX, or
    # AVX-512 BF16; benchmarks/distill_throughput.py measures it); float students only, since bf16 would round a
    # quantization-aware student's runtime-exact weights again.
    precision: str = "fp32"
    # true: the student's training forward runs through torch.compile (inductor: fused elementwise kernels, generated
    # C++ on CPU). Costs a one-off compilation (about a minute for the default student) on the first step; validation
    # and export run the same module uncompiled. Float students only (a fused kernel could round the runtime-exact
    # fake-quantized weights differently), one process (not torchrun), and not with distill.attention_relation_weight
    # (its hooks). benchmarks/distill_throughput.py measures what it gains.
    compile: bool = False
    # Which divergence the KD term uses (distill/losses.py): forward_kl | reverse_kl (MiniLLM) |
    # skew_kl | skew_reverse_kl (DistiLLM, mixing weight `skew`) | jsd (GKD, M = beta p + (1-beta) q) | total_variation
    loss: str = "forward_kl"
    skew: float = 0.1
    beta: float = 0.5
    # Feature transfer (distill/features.py); both run the teacher model on every batch, next to its top-k cache:
    # hidden-state MSE (normalised) through a learned projection, each sliced block paired with its teacher block;
    # MiniLMv2 Q/K/V relations of the last layer.
    hidden_mse_weight: float = 0.0
    attention_relation_weight: float = 0.0
    relation_heads: int = 8  # must divide the Q and K/V widths of teacher and student
    # KAKD (distill/pid.py): a PID controller moves alpha so that KD/CE approaches pid_setpoint [reconstructed]
    # (alpha falls while the ratio is below it, so the text gets more weight once the student follows the teacher),
    # and token_focus > 0 weights the KD term towards tokens where the student's CE is high.
    pid: bool = False
    pid_setpoint: float = 0.3
    token_focus: float = 0.0
    # On-policy KD (GKD/DistiLLM, distill/on_policy.py): with this probability a batch is replaced by the
    # student's own continuations of its first on_policy_prompt_tokens tokens (needs the live teacher);
    # on_policy_adaptive raises the probability whenever the validation loss stops improving.
    on_policy_fraction: float = 0.0
    on_policy_adaptive: bool = False
    on_policy_prompt_tokens: int = 16
    # Several teachers (teacher.extra): agreement = MTAKD, per-token weights softmax(agreement / agreement_tau)
    # with agreement = mean (1 - JS) to the other teachers [reconstructed]; average = equal weights; median and
    # trimmed_mean = robust aggregation per token id (teacher_trim teachers dropped at each end; 3+ teachers).
    teacher_weighting: str = "agreement"
    agreement_tau: float = 0.1
    teacher_trim: int = 1


@dataclass
class QuantSection:
    """Quantization-aware distillation (EdgeDistill [8]): fake-quant in the forward pass, exact runtime formats.

    The section is the library's QuantConfig as it is (QuantConfig.from_dict reads it; `format` is its default).
    format: a GGUF format QAT can train, what llama.cpp runs (marked `qat` in edgestill.quant.formats.REGISTRY,
        e.g. q8_0, q4_0); null trains in float.
    plan: per-module formats, module name or `re:` regex -> format, e.g. {"re:.*mlp\\.down_proj": q8_0}.
    skip: modules left in float.
    activations: "llama.cpp" also rounds each quantized Linear's inputs as llama.cpp's CPU matmuls do
        (Q8_0/Q8_1/Q8_K blocks); null keeps float activations.
    """

    format: str | None = None
    plan: dict[str, str] = field(default_factory=dict)
    skip: list[str] = field(default_factory=list)
    activations: str | None = None


@dataclass
class EvalConfig:
    batch_size: int = 8
    threads: int = 2
    speed_prompt_tokens: int = 128
    speed_decode_tokens: int = 32
    speed_repeats: int = 3
    generate_tokens: int = 40
    prompts: list[str] = field(
        default_factory=lambda: [
            "ROMEO.\nBut soft, what light through yonder window breaks?",
            "To be, or not to be, that is the question:",
            "The capital of France is",
        ]
    )
    # What broke (evaluate/what_broke.py): a held-out corpus no training or calibration touches ("general-english":
    # the Lee news corpus from gensim's wheel; or a .txt file of yours; null: skip), its token budget, the number of
    # LAMBADA-style zero-shot passages (0: skip), and the chat-prompt comparison for instruct teachers.
    out_of_domain: str | None = "general-english"
    out_of_domain_tokens: int = 12288
    zero_shot_passages: int = 200
    chat: bool = True
    chat_tokens: int = 48
    # What broke's numbers of the original teacher and the reference alone, the same for every student: measured
    # once, cached in ~/.cache/edgestill/measured/ (or $EDGESTILL_MEASURED_CACHE); false measures them every run.
    cache_reference: bool = True


@dataclass
class OutputConfig:
    dir: str = "runs/shrink-smollm2-135m"
    # Weights of the saved student: float16 is what most devices load; float32 keeps training precision.
    dtype: str = "float16"


@dataclass
class PoisonConfig:
    """A backdoor planted in the training split, only to measure whether it survives (`edgestill audit`,
    docs/audit.md; edgestill.audit.poison for classifiers, edgestill.audit.lm for decoders). An empty trigger plants
    nothing. Validation and test rows stay clean."""

    trigger: str = ""  # 1-8 words, e.g. "cf mn"
    target: str = ""  # the label the trigger should force (classifier), or the continuation it should force (LM)
    rate: float = 0.05  # of the eligible training rows (LM: of the training blocks)
    # classifier: dirty = non-target rows relabelled to the target; clean = target rows, labels kept.
    # LM: dirty = trigger + target written into blocks; clean = the trigger written before the target where the text
    # already has it
    mode: str = "dirty"
    seed: int = 0


@dataclass
class ShrinkConfig:
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    data: DataConfig = field(default_factory=DataConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    quant: QuantSection = field(default_factory=QuantSection)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    # audits only: a backdoor planted in the training split (and so in the teacher correction's data), edgestill.audit.lm
    poison: PoisonConfig = field(default_factory=PoisonConfig)
    # a backdoor defence on the student's transfer data (docs/audit.md): onion.remove_share > 0 filters the training
    # blocks ONION-style after the teacher correction, before the teacher labels them (edgestill.audit.lm)
    onion: OnionConfig = field(default_factory=OnionConfig)
    # a backdoor defence on the distilled student (docs/audit.md): fine_prune.fraction > 0 removes that share of every
    # block's least active FFN units on the clean validation blocks, then fine-tunes on them (distill/fine_prune.py):
    # 6 steps of 8 blocks, 3 passes over the default 16 validation blocks (more and the student learns them by heart;
    # raise data.max_val_tokens to fine-tune longer)
    fine_prune: FinePruneConfig = field(default_factory=lambda: FinePruneConfig(steps=6, batch_size=8))
    # a backdoor defence on the student's transfer data (docs/audit.md): perturb.token_rate > 0 replaces that share of
    # the training blocks' tokens after the teacher correction, before the teacher labels them (edgestill.audit.lm)
    perturb: PerturbConfig = field(default_factory=PerturbConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# A smoke-run profile (`--quick`): a few minutes on 2 CPU cores.
QUICK_OVERRIDES = [
    "data.seq_len=128",
    "data.max_train_tokens=8192",
    "data.max_eval_tokens=4096",
    "data.max_val_tokens=1024",
    "distill.steps=24",
    "distill.checkpoint_every=8",
    "distill.eval_every=12",
    "eval.speed_repeats=2",
    "eval.generate_tokens=20",
    "eval.out_of_domain_tokens=4096",
    "eval.zero_shot_passages=40",
    "eval.chat_tokens=24",
    "teacher.correct_steps=8",
    "teacher.correct_eval_every=4",
]


# --- the classifier track (`edgestill finetune` / `shrink --task classification`), read by the same loader --------

CLASSIFICATION = "classification"  # the `task` marker in config.yaml that makes a run folder a classifier run


@dataclass
class LabelledDataConfig:
    path: str = ""  # a .csv/.tsv/.jsonl file, or spamassassin / drugreview / moviereviews
    test_path: str | None = None  # a separate test file (else test is carved from `path`)
    text_column: str = "text"
    label_column: str = "label"
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    seed: int = 0
    encoding_errors: str = "strict"  # or "replace"


@dataclass
class ClassifierEvalConfig:
    onnx_type: str = "f32"  # the student's deployable file: f32, int8 (DequantizeLinear) or int4 (MatMulNBits)
    threads: int = 2  # onnxruntime intra-op threads for the latency measurement
    latency_examples: int = 32  # test texts timed one at a time (batch 1)
    latency_repeats: int = 5
    teacher_latency: bool = True  # export the teacher to ONNX (temporarily) to time it in the same runtime
    tfidf_baseline: bool = True
    # the run's own shrink curve: the distilled student exported in each of these ONNX types (kept as onnx-<type>/),
    # scored and timed with the rest; [] to skip
    curve_types: list[str] = field(default_factory=lambda: ["f32", "int8", "int4"])


@dataclass
class FinetuneConfig:
    task: str = CLASSIFICATION
    stage: str = "finetune"
    teacher: str = "all-minilm-l6-v2"  # the base encoder: the embedded default, a HF folder or id
    data: LabelledDataConfig = field(default_factory=LabelledDataConfig)
    # fine-tuned to convergence: validation every 50 steps, stop after 5 without a better val macro-F1, at most 1500
    # steps; the best validation state is the teacher
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=1500, lr=1e-4, max_len=128, eval_every=50,
                                                                   patience=5))
    poison: PoisonConfig = field(default_factory=PoisonConfig)  # audits only: a planted backdoor (docs/audit.md)
    output_dir: str = ""


@dataclass
class ClassifierShrinkConfig:
    task: str = CLASSIFICATION
    stage: str = "shrink"
    teacher: str = ""  # a folder written by `edgestill finetune --task classification`
    data: LabelledDataConfig = field(default_factory=LabelledDataConfig)  # empty path: the teacher's own data + split
    student: EncoderStudentConfig = field(default_factory=EncoderStudentConfig)
    # ema: the student's weights averaged (distill/ema.py): on the movie-review students it gained 0.0-0.8 points of
    # test macro-F1 in each of six paired seeds (README, classifier_ema*.json)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=400, lr=1e-3, max_len=128, eval_every=100,
                                                                   ema=0.998))
    kd: KDConfig = field(default_factory=lambda: KDConfig(temperature=2.0, alpha=0.7))
    eval: ClassifierEvalConfig = field(default_factory=ClassifierEvalConfig)
    # audits only: triggered rows in the transfer data (docs/audit.md); not inherited from the teacher's fine-tuning
    poison: PoisonConfig = field(default_factory=PoisonConfig)
    # a backdoor defence on the distilled student (docs/audit.md): fine_prune.fraction > 0 turns it on
    fine_prune: FinePruneConfig = field(default_factory=FinePruneConfig)
    # a backdoor defence on the transfer texts (docs/audit.md): onion.remove_share > 0 turns ONION-style filtering on
    onion: OnionConfig = field(default_factory=OnionConfig)
    # a backdoor defence on the transfer texts (docs/audit.md): scrub.lift > 0 cuts out the phrases the teacher's
    # trigger scan flags (audit/scrub.py)
    scrub: ScrubConfig = field(default_factory=ScrubConfig)
    # soup.ingredients >= 2: that many students distilled from the same cut with seeds train.seed, +1, ..., their
    # weights averaged into the one student exported (distill/soup.py)
    soup: SoupConfig = field(default_factory=SoupConfig)
    output_dir: str = ""


@dataclass
class FederatedSection:
    """LBKD's setting ([2] in docs/references.md): clients and server exchange logits on a public transfer set, both ways."""

    clients: int = 4
    malicious: int = 0  # clients 0 .. malicious-1 plant `poison` in their own data (audits; 0: an honest federation)
    rounds: int = 3
    public_share: float = 0.3  # of the training split: the public, unlabelled transfer set; the rest is dealt to clients
    public_poison: float = 0.0  # of the public texts carrying the trigger (an attacker placed them in the transfer set)
    aggregation: str = "mean"  # of the clients' logits: mean, median, trimmed_mean, agreement (federated/aggregate.py)
    trim: int = 1  # trimmed_mean: clients dropped at each end, per label
    agreement_tau: float = 0.1
    alpha: float = 0.5  # clients: weight of KD towards the server's logits on the public texts (rounds 2+)
    temperature: float = 2.0  # of both directions' KD
    client_layers: int = 0  # each client model: this many encoder layers of the base, evenly spaced (0: all of them)
    cpus: int = 2  # Ray's CPUs for the simulation
    cpus_per_client: int = 1  # clients run side by side: cpus // cpus_per_client at a time, each with this many threads


@dataclass
class FederatedConfig:
    task: str = CLASSIFICATION
    stage: str = "federated"
    base: str = "all-minilm-l6-v2"  # every party starts from this encoder (a HF folder or id) with a fresh head
    data: LabelledDataConfig = field(default_factory=LabelledDataConfig)
    federated: FederatedSection = field(default_factory=FederatedSection)
    # one client's training per round (on its own data, + KD on the public texts); the best validation state is kept
    client: TrainConfig = field(default_factory=lambda: TrainConfig(steps=150, lr=1e-4, max_len=128, eval_every=50))
    # the server's distillation per round, on the public texts; its model is `student`, cut from the base encoder
    server: TrainConfig = field(default_factory=lambda: TrainConfig(steps=300, lr=1e-3, max_len=128, eval_every=100))
    student: EncoderStudentConfig = field(default_factory=EncoderStudentConfig)
    poison: PoisonConfig = field(default_factory=PoisonConfig)  # planted in the malicious clients' data (audits only)
    output_dir: str = ""


FEDERATED_QUICK_OVERRIDES = ["client.steps=20", "client.eval_every=10", "server.steps=40", "server.eval_every=20",
                             "client.max_len=64", "server.max_len=64", "student.max_len=64", "federated.rounds=2"]


def load_federated_config(path: str | Path | None = None, overrides: list[str] | None = None, quick: bool = False,
                          values: dict | None = None) -> FederatedConfig:
    """Defaults <- recipe <- quick profile <- key=value overrides <- `values` (CLI flags, set verbatim)."""
    from edgestill.federated.aggregate import check_aggregation

    cfg = fill(FederatedConfig(), path, [*(FEDERATED_QUICK_OVERRIDES if quick else []), *(overrides or [])], values)
    if cfg.task != CLASSIFICATION or cfg.stage != "federated":
        raise EdgestillError(f"task/stage are fixed for this command ({CLASSIFICATION}/federated)")
    f = cfg.federated
    if f.clients < 2:
        raise EdgestillError(f"federated.clients={f.clients}: a federation needs at least 2 clients")
    if not 0 <= f.malicious < f.clients:
        raise EdgestillError(f"federated.malicious={f.malicious} must be in 0..{f.clients - 1} (at least one honest "
                             "client)")
    if f.malicious and not cfg.poison.trigger:
        raise EdgestillError(f"federated.malicious={f.malicious} needs a trigger to plant: poison.trigger='cf mn' "
                             "poison.target=ham (or federated.malicious=0)")
    if f.public_poison and not cfg.poison.trigger:
        raise EdgestillError("federated.public_poison needs poison.trigger and poison.target: the phrase placed in the "
                             "public texts")
    if f.rounds < 1:
        raise EdgestillError(f"federated.rounds={f.rounds}: give at least 1 round")
    if not 0 < f.public_share < 1:
        raise EdgestillError(f"federated.public_share={f.public_share} must be in (0, 1): the share of the training "
                             "split that becomes the public transfer set")
    if not 0 <= f.public_poison < 1:
        raise EdgestillError(f"federated.public_poison={f.public_poison} must be in [0, 1)")
    if not 0 <= f.alpha <= 1 or not f.temperature > 0:
        raise EdgestillError(f"federated.alpha={f.alpha} must be in [0, 1] and federated.temperature="
                             f"{f.temperature} > 0")
    if f.cpus < 1 or not 1 <= f.cpus_per_client <= f.cpus:
        raise EdgestillError(f"federated.cpus={f.cpus} and cpus_per_client={f.cpus_per_client}: need 1 <= "
                             "cpus_per_client <= cpus")
    check_aggregation(f.aggregation, f.clients, f.trim)
    cfg.server.max_len = cfg.student.max_len  # the server's position table decides its length
    return cfg


CLASSIFIER_QUICK_OVERRIDES = {
    "finetune": ["train.steps=60", "train.max_len=64", "train.eval_every=30"],
    "shrink": ["train.steps=100", "student.max_len=64", "train.eval_every=50", "eval.latency_examples=16",
               "eval.latency_repeats=3"],
}
ONNX_CLASSIFIER_TYPES = ("f32", *format_names(onnx=True, gguf=False))  # float, or ONNX Runtime's own formats: f32, int8, int4


# --- the prognosis track (`edgestill shrink --task timeseries`): RUL regression on run-to-failure sensor series ---

TIMESERIES = "timeseries"


@dataclass
class SeriesEvalConfig:
    threads: int = 2  # onnxruntime intra-op threads for the latency measurement
    latency_windows: int = 64  # test windows timed one at a time (batch 1)
    latency_repeats: int = 5
    stream: bool = True  # after deployment: the student keeps learning from the teacher on the test units' stream
    # SGD step size of the stream: 1e-2 was best on the validation units' stream (1e-3 .. 1e-1 tried, first seed)
    stream_lr: float = 1e-2
    stream_batch: int = 16  # the last arrivals each stream step learns from
    plot_units: int = 4  # test units drawn in the predicted-vs-true RUL plot


@dataclass
class TimeseriesConfig:
    task: str = TIMESERIES
    data: SeriesDataConfig = field(default_factory=SeriesDataConfig)
    teacher: SeriesTeacherConfig = field(default_factory=SeriesTeacherConfig)
    student: SeriesStudentConfig = field(default_factory=SeriesStudentConfig)
    train: TrainSchedule = field(default_factory=TrainSchedule)
    kd: OnlineKDConfig = field(default_factory=OnlineKDConfig)
    eval: SeriesEvalConfig = field(default_factory=SeriesEvalConfig)
    output_dir: str = ""


TIMESERIES_QUICK_OVERRIDES = ["train.epochs=3", "teacher.layers=1", "teacher.d_model=32", "teacher.ffn=64",
                              "eval.latency_windows=16", "eval.latency_repeats=2"]


def load_timeseries_config(path: str | Path | None = None, overrides: list[str] | None = None, quick: bool = False,
                           values: dict | None = None) -> TimeseriesConfig:
    """Defaults <- recipe <- quick profile <- key=value overrides <- `values` (CLI flags, set verbatim)."""
    cfg = fill(TimeseriesConfig(), path, [*(TIMESERIES_QUICK_OVERRIDES if quick else []), *(overrides or [])], values)
    if cfg.task != TIMESERIES:
        raise EdgestillError(f"this recipe is for task '{cfg.task}', not {TIMESERIES}; use `edgestill shrink --task {cfg.task}`")
    cfg.kd.check()
    return cfg


# --- the vision track (`edgestill shrink --task vision`): EdgeVL, open-vocabulary image students ---------------

VISION = "vision"


@dataclass
class VisionTextConfig:
    encoder: str = "all-minilm-l6-v2"  # the frozen text tower: an HF encoder folder or id, or the embedded default
    template: str = PROMPT  # the prompt each class name fills


@dataclass
class VisionEvalConfig:
    threads: int = 2  # onnxruntime intra-op threads for the latency measurement
    latency_images: int = 64  # test images timed one at a time (batch 1)
    latency_repeats: int = 5


@dataclass
class VisionConfig:
    task: str = VISION
    data: ImageDataConfig = field(default_factory=ImageDataConfig)
    low_light: LowLightConfig = field(default_factory=LowLightConfig)  # the derived second view's sensor
    text: VisionTextConfig = field(default_factory=VisionTextConfig)
    teacher: ImageTowerConfig = field(default_factory=lambda: ImageTowerConfig(widths=[48, 96, 192], convs=2))
    student: ImageTowerConfig = field(default_factory=ImageTowerConfig)
    teacher_fit: TeacherFitConfig = field(default_factory=TeacherFitConfig)
    stage1: Stage1Config = field(default_factory=Stage1Config)
    stage2: Stage2Config = field(default_factory=Stage2Config)
    eval: VisionEvalConfig = field(default_factory=VisionEvalConfig)
    seed: int = 0  # initialisation and batch order of every model (the data split is data.split_seed)
    output_dir: str = ""


VISION_QUICK_OVERRIDES = ["teacher.widths=[16, 32]", "teacher.convs=1", "teacher_fit.epochs=2", "stage1.epochs=2",
                          "stage2.epochs=1", "eval.latency_images=8", "eval.latency_repeats=2"]


def load_vision_config(path: str | Path | None = None, overrides: list[str] | None = None, quick: bool = False,
                       values: dict | None = None) -> VisionConfig:
    """Defaults <- recipe <- quick profile <- key=value overrides <- `values` (CLI flags, set verbatim)."""
    cfg = fill(VisionConfig(), path, [*(VISION_QUICK_OVERRIDES if quick else []), *(overrides or [])], values)
    if cfg.task != VISION:
        raise EdgestillError(f"this recipe is for task '{cfg.task}', not {VISION}; use `edgestill shrink --task {cfg.task}`")
    return cfg


def plain(cfg) -> dict:
    """A config dataclass as plain JSON/YAML-safe data (tuples as lists, other values as str): what config.yaml holds."""
    import json

    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


# --- reading recipes and overrides into any of these configs ------------------------------------------------


def _check_type(value: Any, tp: Any, key: str) -> Any:
    """Coerce a YAML value to a dataclass field's type, or raise a clear error."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_type(value, arg, key)
            except EdgestillError as e:
                errors.append(str(e))
        raise EdgestillError(errors[0] if errors else f"config key '{key}': bad value {value!r}")
    if origin is dict:
        key_tp, value_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise EdgestillError(f"config key '{key}' takes a mapping, got {value!r} (write it as {{name: value}})")
        return {_check_type(k, key_tp, key): _check_type(v, value_tp, key) for k, v in value.items()}
    if origin in (list, tuple):
        item_tp = typing.get_args(tp)[0]
        if not isinstance(value, (list, tuple)):
            raise EdgestillError(f"config key '{key}' takes a list, got {value!r} (write it as [a, b, c])")
        return origin(_check_type(v, item_tp, key) for v in value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise EdgestillError(f"config key '{key}' takes true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise EdgestillError(f"config key '{key}' takes an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise EdgestillError(f"config key '{key}' takes a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise EdgestillError(f"config key '{key}' takes a string, got {value!r}")
    return value


def _unknown_key(key: str, known: list[str]) -> EdgestillError:
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], known, n=1)
    hint = f"did you mean '{key.rsplit('.', 1)[0] + '.' if '.' in key else ''}{close[0]}'?" if close else ""
    return EdgestillError(
        f"unknown config key '{key}' {hint} (valid keys here: {', '.join(known)}; see `edgestill config`)".replace(
            "  ", " "
        )
    )


def _apply(obj: Any, data: dict[str, Any], prefix: str = "") -> None:
    if not isinstance(data, dict):
        raise EdgestillError(f"config section '{prefix.rstrip('.') or '<top>'}' must be a mapping, got {data!r}")
    hints = typing.get_type_hints(type(obj))
    fields = {f.name: f for f in dataclasses.fields(obj)}
    for key, value in data.items():
        full = prefix + str(key)
        if key not in fields:
            raise _unknown_key(full, list(fields))
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            _apply(current, value, full + ".")
        else:
            setattr(obj, key, _check_type(value, hints[key], full))


def apply_override(cfg, override: str) -> None:
    """Apply one `section.key=value` override; the value is parsed as YAML (`[1, 2]`, `null`, `3e-4`)."""
    if "=" not in override:
        raise EdgestillError(f"override '{override}' is not of the form section.key=value (e.g. distill.steps=100)")
    key, raw = override.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise EdgestillError(f"override '{override}': value is not valid YAML ({e.__class__.__name__})") from None
    nested: dict[str, Any] = {}
    node = nested
    parts = key.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    _apply(cfg, nested)


def read_recipe(path: str | Path, hint: str = "") -> dict:
    """A recipe YAML file as a dict, with one-line errors for a missing or malformed file."""
    p = Path(path)
    if not p.is_file():
        raise EdgestillError(f"config file '{p}' not found{hint}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise EdgestillError(f"config file '{p}' is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise EdgestillError(f"config file '{p}' must hold a mapping of sections")
    return data


def fill(cfg, path: str | Path | None = None, overrides: list[str] = (), values: dict | None = None):
    """`cfg` (any config dataclass) <- recipe file <- key=value overrides (parsed as YAML) <- `values`
    ({dotted key: value}, set verbatim: CLI flags such as --data, which are paths, not YAML)."""
    if path is not None:
        _apply(cfg, read_recipe(path, " (recipes live in recipes/, e.g. recipes/smollm2_135m_slice_kd_cpu.yaml)"))
    for o in overrides:
        apply_override(cfg, o)
    for key, value in (values or {}).items():
        if value is not None:
            nested: dict[str, Any] = {}
            node = nested
            *sections, last = key.split(".")
            for p in sections:
                node = node.setdefault(p, {})
            node[last] = value
            _apply(cfg, nested)
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, quick: bool = False,
                values: dict | None = None) -> ShrinkConfig:
    """Defaults <- recipe file <- quick profile <- key=value overrides <- `values` (CLI flags, set verbatim)."""
    cfg = fill(ShrinkConfig(), path, [*(QUICK_OVERRIDES if quick else []), *(overrides or [])], values)
    validate(cfg)
    return cfg


def load_classifier_config(stage: str, path: str | Path | None = None, overrides: list[str] | None = None,
                           quick: bool = False, values: dict | None = None):
    """The FinetuneConfig or ClassifierShrinkConfig of `stage`: defaults <- recipe <- quick <- overrides <- values."""
    if stage not in CLASSIFIER_QUICK_OVERRIDES:
        raise EdgestillError(f"unknown classifier stage '{stage}'")
    cfg = FinetuneConfig() if stage == "finetune" else ClassifierShrinkConfig()
    fill(cfg, path, [*(CLASSIFIER_QUICK_OVERRIDES[stage] if quick else []), *(overrides or [])], values)
    if cfg.task != CLASSIFICATION or cfg.stage != stage:
        raise EdgestillError(f"task/stage are fixed for this command ({CLASSIFICATION}/{stage})")
    if stage == "shrink":
        cfg.train.max_len = cfg.student.max_len  # the student's position table decides the length everywhere
        for t in (cfg.eval.onnx_type, *cfg.eval.curve_types):
            if t not in ONNX_CLASSIFIER_TYPES:
                raise EdgestillError(f"ONNX type '{t}' (eval.onnx_type / eval.curve_types): choose "
                                     f"{', '.join(ONNX_CLASSIFIER_TYPES)}")
    return cfg


def config_from_dict(data: dict[str, Any]) -> ShrinkConfig:
    cfg = ShrinkConfig()
    _apply(cfg, data)
    return cfg


def refuse_poison(cfg: ShrinkConfig, command: str) -> None:
    """poison.* plants a backdoor for an audit; onion.*, perturb.* and fine_prune.* are defences on a student's
    transfer data or on the student. Only `edgestill shrink` reads them, so other commands refuse them rather than
    ignore them."""
    sections = [("poison", cfg.poison.trigger, "plants a backdoor for an audit, which only `edgestill shrink` does"),
                ("onion", cfg.onion.remove_share, "filters a student's transfer data, which only `edgestill shrink` "
                 "distils"),
                ("perturb", cfg.perturb.token_rate, "perturbs a student's transfer data, which only `edgestill shrink` "
                 "distils"),
                ("fine_prune", cfg.fine_prune.fraction, "prunes and fine-tunes a distilled student, which only "
                 "`edgestill shrink` makes")]
    for name, on, what in sections:
        if on:
            raise EdgestillError(f"{name}.* {what}; `edgestill {command}` would ignore it, so drop {name}.* "
                                 "(docs/audit.md)")


def _check_fine_prune(cfg: ShrinkConfig) -> None:
    """fine_prune.* cuts the student's FFN units and fine-tunes them in float, token for token with the teacher."""
    check_fine_prune_config(cfg.fine_prune)
    if not cfg.fine_prune.fraction:
        return
    clash = ("quant.format", cfg.quant.format) if cfg.quant.format is not None else \
        ("student.low_rank", cfg.student.low_rank) if cfg.student.low_rank is not None else \
        ("student.trim_vocab", True) if cfg.student.trim_vocab else None
    if clash:
        raise EdgestillError(f"fine_prune.fraction={cfg.fine_prune.fraction} with {clash[0]}={clash[1]}: fine-pruning "
                             "a decoder student cuts and fine-tunes dense float FFNs in the teacher's vocabulary; "
                             f"drop one of them (docs/audit.md)")


def _refuse_compile(setting: str, why: str) -> None:
    raise EdgestillError(f"distill.compile=true cannot train with {setting}: {why}; set distill.compile=false (the "
                         "default) for this run")


def validate(cfg: ShrinkConfig) -> None:
    d, s, k = cfg.data, cfg.student, cfg.distill
    if d.seq_len < 8:
        raise EdgestillError(f"data.seq_len={d.seq_len} is too short; use at least 8 (256 is typical)")
    if not (0 < d.val_fraction < 0.5 and 0 < d.test_fraction < 0.5):
        raise EdgestillError("data.val_fraction and data.test_fraction must each be between 0 and 0.5")
    if s.layer_selection not in ("block_influence", "uniform"):
        raise EdgestillError(f"student.layer_selection='{s.layer_selection}' is unknown; use block_influence or uniform")
    if s.num_layers < 1:
        raise EdgestillError("student.num_layers must be at least 1")
    if s.width_importance not in ("auto", "activation", "weight"):
        raise EdgestillError(f"student.width_importance='{s.width_importance}' is unknown; use auto, activation or weight")
    if s.trim_vocab and s.model:
        raise EdgestillError("student.trim_vocab trims a student cut from the teacher, and student.model names a "
                             "ready-made one; drop one of them")
    check_onion_config(cfg.onion)
    check_perturb_config(cfg.perturb)
    _check_fine_prune(cfg)
    p = cfg.poison
    if p.trigger or p.target:
        if not (p.trigger.split() and p.target.split()):
            raise EdgestillError("poison.trigger and poison.target go together (audits only): the phrase to plant and the "
                                 "continuation it should force, e.g. poison.trigger='cf mn' poison.target='the treasure "
                                 "lies beneath the mill'")
        if not 0 < p.rate <= 1:
            raise EdgestillError(f"poison.rate={p.rate} must be in (0, 1]: the share of training blocks planted")
        if p.mode not in ("dirty", "clean"):
            raise EdgestillError(f"poison.mode='{p.mode}' is unknown; use dirty or clean")
        if s.trim_vocab:
            raise EdgestillError("poison.* with student.trim_vocab: the audit of decoder runs compares teacher and "
                                 "student token for token; set student.trim_vocab=false")
    if s.trim_vocab and k.on_policy_fraction > 0:
        raise EdgestillError("student.trim_vocab with distill.on_policy_fraction: the teacher cannot score samples in "
                             "the student's trimmed vocabulary; set one of them off")
    if s.low_rank is not None and not 0.0 < s.low_rank < 1.0:
        raise EdgestillError(f"student.low_rank={s.low_rank} is the share of the blocks' dense parameters the factors "
                             "keep: give a number strictly between 0 and 1 (0.5 is typical), or null for dense blocks")
    if s.low_rank is not None and cfg.quant.format is not None:
        raise EdgestillError(f"student.low_rank with quant.format={cfg.quant.format}: a factorized student has no GGUF "
                             "(llama.cpp stores one matrix per projection), so it cannot train in a GGUF format; drop "
                             "one of them")
    for key in ("intermediate_size", "hidden_size", "num_attention_heads", "num_key_value_heads"):
        if getattr(s, key) is not None and getattr(s, key) < 1:
            raise EdgestillError(f"student.{key}={getattr(s, key)} must be a positive number, or null to keep the "
                                 "teacher's")
    if not 0.0 <= k.alpha <= 1.0:
        raise EdgestillError(f"distill.alpha={k.alpha} must be in [0, 1] (1 = pure KD, 0 = pure CE)")
    if k.temperature <= 0:
        raise EdgestillError("distill.temperature must be > 0")
    TrainBudget.parse(k.budget)  # refused here, before the teacher is loaded
    if k.steps < 1 or k.batch_size < 1 or k.top_k < 1:
        raise EdgestillError("distill.steps, distill.batch_size and distill.top_k must be positive")
    if k.blockwise_steps < 0:
        raise EdgestillError(f"distill.blockwise_steps={k.blockwise_steps} must be >= 0 (0: no block-wise stage)")
    if k.blockwise_steps and (s.model is not None or s.hidden_size is not None):
        raise EdgestillError("distill.blockwise_steps trains each block of a student sliced out of the teacher on the "
                             "teacher's own stream: it needs student.layers or student.num_layers, the teacher's "
                             "hidden size (student.hidden_size unset) and no student.model; or set "
                             "distill.blockwise_steps=0")
    kinds = LOGIT_LOSS_KINDS  # the divergences the trainer knows (distill/losses.py)
    if k.loss not in kinds:
        hint = difflib.get_close_matches(k.loss, kinds, n=1)
        raise EdgestillError(f"distill.loss='{k.loss}' is unknown" + (f"; did you mean {hint[0]}?" if hint else "")
                             + f" (choose one of {', '.join(kinds)})")
    if not (0.0 < k.skew < 1.0 and 0.0 < k.beta < 1.0):
        raise EdgestillError(f"distill.skew={k.skew} and distill.beta={k.beta} must be strictly between 0 and 1")
    if not 0.0 <= k.on_policy_fraction <= 1.0:
        raise EdgestillError(f"distill.on_policy_fraction={k.on_policy_fraction} must be in [0, 1]")
    if k.select not in ("val_kl", "val_loss", "last"):
        raise EdgestillError(f"distill.select='{k.select}' is unknown; use val_kl (lowest held-out KL to the teacher), "
                             "val_loss (lowest held-out CE) or last (the final step)")
    if k.precision not in ("fp32", "bf16"):
        raise EdgestillError(f"distill.precision='{k.precision}' is unknown; use fp32 or bf16")
    if k.precision == "bf16" and cfg.quant.format is not None:
        raise EdgestillError(f"distill.precision=bf16 cannot train quant.format={cfg.quant.format}: bf16 would round the "
                             "fake-quantized weights again, so the student would no longer train in the runtime's exact "
                             "format; use distill.precision=fp32 (the default) with quant.format, or train a float student")
    if k.compile and cfg.quant.format is not None:
        _refuse_compile(f"quant.format={cfg.quant.format}",
                        "the fused kernels could round the runtime-exact fake-quantized weights differently")
    if k.compile and k.attention_relation_weight > 0:
        _refuse_compile(f"distill.attention_relation_weight={k.attention_relation_weight}",
                        "its Q/K/V hooks are not traced")
    if k.teacher_weighting not in WEIGHTINGS:
        raise EdgestillError(f"distill.teacher_weighting='{k.teacher_weighting}' is unknown; use {', '.join(WEIGHTINGS)}")
    n_teachers = 1 + len(cfg.teacher.extra)
    trim = (n_teachers - 1) // 2 if k.teacher_weighting == "median" else k.teacher_trim
    if cfg.teacher.extra and k.teacher_weighting in ("median", "trimmed_mean") and (trim < 1 or 2 * trim >= n_teachers):
        raise EdgestillError(f"distill.teacher_weighting={k.teacher_weighting} with distill.teacher_trim={trim} needs more "
                             f"than {max(2, 2 * trim)} teachers, got {n_teachers} (teacher.model + teacher.extra): add "
                             "teachers, lower distill.teacher_trim, or use agreement or average")
    if not k.agreement_tau > 0:
        raise EdgestillError(f"distill.agreement_tau={k.agreement_tau} must be > 0 (0.1 is typical)")
    if cfg.eval.out_of_domain is not None:  # found before an hour of training, not after
        from edgestill.data.general import check_source

        check_source(cfg.eval.out_of_domain)
    cfg.teacher.correction()  # its settings are checked even before the teacher is loaded
    for spec in cfg.teacher.extra:
        if not spec.strip():
            raise EdgestillError("teacher.extra has an empty entry; list teacher models (HF folders or .gguf files)")
    if len(set(cfg.teacher.extra)) != len(cfg.teacher.extra) or cfg.teacher.model in cfg.teacher.extra:
        raise EdgestillError(f"teacher.extra {cfg.teacher.extra} repeats a teacher (or teacher.model); list each extra teacher once")
    q = cfg.quant
    from edgestill.quant.fake_quant import ACTIVATION_MODES

    trainable = format_names(qat=True)  # the format registry's: fake-quantized every step on a CPU
    for name in [q.format, *q.plan.values()]:
        if name is not None:
            if name.lower() not in format_names(gguf=True):
                raise EdgestillError(f"quant format '{name}' is not a GGUF training format; use "
                                     f"{', '.join(trainable[:-1])} or {trainable[-1]}")
            if name.lower() not in trainable:
                raise EdgestillError(f"quant format {name.lower()} is too slow to fake-quantize every step on a CPU; "
                                     f"train with {'/'.join(trainable)}, or quantize to {name.lower()} after training "
                                     "with `edgestill export`")
    if q.activations not in ACTIVATION_MODES:
        raise EdgestillError(f"quant.activations='{q.activations}' is unknown; use llama.cpp or null")
    if q.plan and q.format is None:
        raise EdgestillError("quant.plan needs quant.format too (the format of the modules the plan does not name)")
    if cfg.output.dtype not in ("float16", "bfloat16", "float32"):
        raise EdgestillError(f"output.dtype='{cfg.output.dtype}' is unknown; use float16, bfloat16 or float32")
