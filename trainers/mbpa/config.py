"""The MbPA trainer's configuration: one frozen dataclass for the three experiments.

Defaults are the paper's values where the paper gives them (the language-model grid's best
cell: N=5000, K=256, lambda_cache=0.15, lambda_mbpa=0.1, T=1, alpha=0.15; permuted MNIST with
10,000 examples a task, Adam). Where the paper is silent the default is our choice and the
comment says so.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Literal

from hpsweep.trainer.config import DataPath, OutputName

__all__ = ["Config", "METRICS"]

#: every metric name ``train`` may report (fnmatch patterns)
METRICS = (
    # permuted_mnist: after each task (step = tasks done)
    "acc/task_*", "acc/mean", "valid/acc_mean", "train/loss",
    # incremental: step = updates since the new classes arrived
    "acc/old", "acc/new", "acc/all",
    # lm
    "valid/ppl", "test/ppl", "valid/ppl_lstm", "test/ppl_lstm",
)

Experiment = Literal["permuted_mnist", "incremental", "lm"]
Method = Literal["sgd", "ewc", "mbpa"]


@dataclasses.dataclass(frozen=True)
class Config:
    seed: int = 0                        # initialisation and example order
    # MNIST experiments: the data split (task permutations, which images each task uses). The
    # paper tunes on split 0 and reports the mean over the other splits; a sweep makes it an axis.
    split: int = 0
    experiment: Experiment = "permuted_mnist"
    # sgd: plain sequential training (in `incremental` this is fine-tuning); ewc: diagonal
    # Fisher penalty (permuted_mnist only); mbpa: the same parametric training, plus memory-based
    # local adaptation at prediction time. The `lm` experiment always evaluates with the
    # memory; its lambda_cache / lambda_mbpa select the mixture (0, 0 = the LSTM alone).
    method: Method = "mbpa"

    # --- data (None: required by the experiment that reads it) -------------------------------
    data_dir: Annotated[str | None, DataPath] = None  # MNIST IDX files (gz or not), or PTB-format token files
    lm_prefix: str = "ptb"               # LM files: {data_dir}/{prefix}.{train,valid,test}.txt
    # incremental: "image_folder" reads data_dir/{train,test}/<class name>/<images> (sorted class
    # names are the labels), converted to image_channels (1 grey, 3 RGB) and resized to
    # image_size x image_size (None: as stored, one size required)
    data_format: Literal["mnist", "image_folder"] = "mnist"
    image_size: int | None = None
    image_channels: Literal[1, 3] = 1

    # --- episodic memory and local adaptation ------------------------------------------------
    memory_size: int = 5000              # N: capacity, circular (oldest out first)
    neighbours: int = 256                # K
    steps: int = 1                       # T: local adaptation steps
    alpha: float = 0.15                  # alpha_M: local learning rate
    beta: float = 0.0                    # strength of (beta/2)||theta_x - theta||^2 (our default)
    local_optimizer: Literal["sgd", "rmsprop"] = "sgd"
    rmsprop_decay: float = 0.9           # RMSprop's moving-average decay (TensorFlow's default)
    rmsprop_eps: float = 1e-6
    kernel_eps: float = 1e-3             # w_k = 1 / (eps + ||q - h_k||^2)
    normalise_weights: bool = True       # w_k / sum_j w_j (see trainers/mbpa/memory.py)
    # Memory keys for the MNIST experiments. "pixels": the raw image, g = the whole MLP;
    # "hidden": the MLP's last hidden layer, g = its output layer. Default pixels: a stored
    # key never goes stale, whereas the hidden representation of an old task drifts while
    # later tasks are learned, so keys written then no longer match queries embedded now.
    keys: Literal["pixels", "hidden"] = "pixels"
    adapt_chunk: int = 64                # queries adapted together (bounds per-query copies)
    # Neighbour search (MNIST experiments; the LM's memory is always exact). "exact": matrix
    # product and top-k over the whole memory; "ivf": faiss IndexIVFFlat, rebuilt at the first
    # search after writes; "auto": exact up to 100,000 stored entries, IVF above.
    memory_index: Literal["exact", "ivf", "auto"] = "exact"
    index_nprobe: int = 12               # IVF lists scanned per query (bench/mbpa_adapt.py: <= 50 ms at 10^5)
    index_nlist: int | None = None       # IVF lists; None: 4 sqrt(N) (trainers/mbpa/memory.py)

    # --- MNIST classifiers -------------------------------------------------------------------
    hidden: int = 100                    # two hidden layers of this width (our choice)
    lr: float = 1e-3                     # Adam
    batch_size: int = 32                 # our choice
    epochs_per_task: int = 1
    num_tasks: int = 10                  # permuted MNIST tasks
    train_per_task: int = 10000          # the paper's 10,000 examples a task
    valid_per_task: int = 1000           # held out of MNIST's training images, for tuning
    test_per_task: int | None = None     # None: all 10,000 test images
    ewc_lambda: float = 100.0            # EWC penalty strength (swept)
    fisher_samples: int = 1000           # examples for the diagonal empirical Fisher
    # incremental classes: pretrain on digits 0-4, then train on 0-9
    pretrain_classes: int | None = None  # labels below this come first; None: the first half
    pretrain_epochs: int = 1
    incremental_updates: int = 200       # updates after the new classes arrive
    eval_every: int = 20                 # updates between evaluations in that phase
    new_class_fraction: float = 1.0      # <1: imbalance variant (fraction of new-class examples kept)

    # --- language model ----------------------------------------------------------------------
    lm_embed: int = 200                  # LSTM sizes: Zaremba et al.'s small PTB model (our choice)
    lm_hidden: int = 200
    lm_layers: int = 2
    lm_dropout: float = 0.0
    lm_lr: float = 1e-3                  # Adam
    lm_batch: int = 20
    lm_bptt: int = 35
    lm_clip: float = 0.25
    lm_epochs: int = 6
    lm_max_steps: int | None = None      # cap on training updates (CPU-sized runs)
    lm_train_tokens: int | None = None   # use only the first tokens of each file (CPU-sized runs)
    lm_eval_tokens: int | None = None
    lm_eval_chunk: int = 128             # consecutive positions evaluated together (exact: masked)
    lambda_cache: float = 0.15
    lambda_mbpa: float = 0.1
    cache_theta: float = 0.3             # neural cache flatness (Grave et al. 2017 use ~0.3 on PTB)
    # a model file from a `train_only` run (output:NAME, or a data path): skip training;
    # {seed} stands for the run's seed
    lm_checkpoint: Annotated[str | None, DataPath] = None
    train_only: bool = False             # stage 1: train the LSTM, save it, skip the memory eval
    # the output name stage 1 writes the model to (run.output: the sweep's storage, outputs/NAME);
    # {seed} stands for the run's seed
    save_model_to: Annotated[str | None, OutputName] = None

    # --- reporting ---------------------------------------------------------------------------
    report_every: int = 100              # LM training updates between reports

    def __post_init__(self) -> None:
        problems: list[str] = []

        def need(cond: bool, message: str) -> None:
            if not cond:
                problems.append(message)

        for name in ("memory_size", "neighbours", "adapt_chunk", "index_nprobe", "hidden", "batch_size",
                     "epochs_per_task", "num_tasks", "train_per_task", "fisher_samples",
                     "lm_embed", "lm_hidden", "lm_layers", "lm_batch", "lm_bptt",
                     "lm_eval_chunk", "report_every", "eval_every"):
            value = getattr(self, name)
            need(value >= 1, f"{name} must be >= 1, got {name}={value}")
        for name in ("steps", "pretrain_epochs", "incremental_updates", "valid_per_task", "lm_epochs"):
            value = getattr(self, name)
            need(value >= 0, f"{name} must be >= 0, got {name}={value}")
        for name in ("alpha", "beta", "ewc_lambda", "cache_theta", "lm_clip"):
            value = getattr(self, name)
            need(value >= 0, f"{name} must be >= 0, got {name}={value}")
        for name in ("lr", "lm_lr", "kernel_eps", "rmsprop_eps"):
            value = getattr(self, name)
            need(value > 0, f"{name} must be > 0, got {name}={value}")
        for name in ("test_per_task", "lm_max_steps", "lm_train_tokens", "lm_eval_tokens", "index_nlist",
                     "image_size", "pretrain_classes"):
            value = getattr(self, name)
            need(value is None or value >= 1, f"{name} must be >= 1 or null, got {name}={value}")
        need(0 <= self.rmsprop_decay < 1, f"rmsprop_decay must be in [0, 1), got rmsprop_decay={self.rmsprop_decay}")
        need(0 <= self.lm_dropout < 1, f"lm_dropout must be in [0, 1), got lm_dropout={self.lm_dropout}")
        need(0 < self.new_class_fraction <= 1,
             f"new_class_fraction must be in (0, 1], got new_class_fraction={self.new_class_fraction}")
        need(self.lambda_cache >= 0 and self.lambda_mbpa >= 0 and self.lambda_cache + self.lambda_mbpa <= 1,
             "lambda_cache and lambda_mbpa must be >= 0 with lambda_cache + lambda_mbpa <= 1, got "
             f"lambda_cache={self.lambda_cache} lambda_mbpa={self.lambda_mbpa}")
        need(self.seed >= 0, f"seed must be >= 0, got seed={self.seed}")
        need(self.split >= 0, f"split must be >= 0, got split={self.split}")
        if self.experiment == "permuted_mnist":
            need(self.train_per_task + self.valid_per_task <= 60000,
                 f"train_per_task + valid_per_task must be <= 60000 (MNIST's training images), got "
                 f"{self.train_per_task} + {self.valid_per_task}")
        need(self.image_channels in (1, 3), f"image_channels must be 1 or 3, got image_channels={self.image_channels}")
        need(self.memory_index in ("exact", "ivf", "auto"),
             f"memory_index must be exact, ivf or auto, got memory_index={self.memory_index!r}")
        need(self.data_format == "mnist" or self.experiment == "incremental",
             f"data_format={self.data_format!r} is for experiment=incremental (permuted_mnist permutes "
             "MNIST's 784 pixels; lm reads token files)")
        need(self.data_format == "image_folder" or self.image_size is None,
             "image_size resizes an image folder: set data_format=image_folder or leave image_size unset")
        if self.experiment == "incremental":
            need(self.method != "ewc", "method=ewc is only for experiment=permuted_mnist; "
                 "experiment=incremental compares sgd (fine-tuning) with mbpa")
        if self.experiment == "lm":
            need(self.method == "mbpa", f"experiment=lm evaluates with the memory: method must be mbpa, "
                 f"got method={self.method!r} (set lambda_cache=0 lambda_mbpa=0 for the LSTM alone)")
            need(not (self.train_only and self.lm_checkpoint is not None),
                 "train_only=true trains a new LSTM: leave lm_checkpoint unset")
            need(self.save_model_to is None or self.lm_checkpoint is None,
                 "save_model_to is for the run that trains the LSTM; this run loads lm_checkpoint")
        else:
            need(not self.train_only and self.lm_checkpoint is None and self.save_model_to is None,
                 "train_only, lm_checkpoint and save_model_to are options of experiment=lm")
        if problems:
            raise ValueError("; ".join(problems))
