"""The options of ``harden`` and ``certify`` as one plain dataclass.

Kept apart from ``pipeline`` (which needs torch) so that the command line can read the
defaults without importing torch: ``robnet-svc --help`` starts in a fraction of a second.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from robnet_svc.errors import RobnetError


@dataclass
class Options:
    """Every option of ``harden`` and ``certify`` (``certify`` ignores the training ones).
    The command line's defaults are these."""

    model: str = ""
    dataset: str = "digits"
    data_dir: str | None = None
    dataset_options: dict[str, object] = field(default_factory=dict)  # passed to the dataset's constructor
    image_shape: str | None = None
    perturbation: str = "bias-field"
    perturbation_options: dict[str, object] = field(default_factory=dict)  # passed to the perturbation
    eps: float = 0.1
    order: object = None           # shorthands of perturbation_options["order"] etc. (None: not given)
    mode: object = None
    coef_scale: object = None
    method: str = "rsip-ssip"
    cert_method: str = "rsip-ssip"
    epochs: int = 10
    ramp_epochs: float | None = None
    alpha: float = 1.0
    lr: float = 5e-4
    batch_size: int = 64           # the GLOBAL batch: shared by every process of a distributed run
    cert_batch_size: int = 128     # per process
    device: str = "auto"
    seed: int = 0
    val_fraction: float = 0.1
    max_train: int | None = None
    max_test: int | None = None
    attack_steps: int = 10
    attack_restarts: int = 8
    radius: bool = False           # per-sample certified radius by bisection (costly: see docs/cli.md)
    radius_max: float | None = None        # None: 2 x eps
    radius_precision: float | None = None  # None: radius_max / 50
    threads: int | None = None     # None: robnet_svc.threads.default_threads()
    checkpoint_every: float = 60.0  # seconds between checkpoints within an epoch
    max_clean_drop: float | None = 0.02  # validation clean-accuracy budget of harden (None: none)
    max_class_drop: float | None = 0.10  # warn when a class's validation accuracy falls more (None: never)
    strict: bool = False           # harden: exit 5 when the target eps was not reached within the budget
    out: str | None = None
    force: bool = False
    resume: bool = False
    report_page: bool = True       # harden: figures and report.html in --out/report

    def perturbation_settings(self) -> dict[str, object]:
        """The options given to the perturbation: ``perturbation_options`` with the shorthands
        ``order``, ``mode``, ``coef_scale`` (``--order`` ...) added; a shorthand and an entry of
        ``perturbation_options`` that disagree are a RobnetError (which one was meant is a guess)."""
        given = dict(self.perturbation_options)
        for key in SHORTHANDS:
            value = getattr(self, key)
            if value is None:
                continue
            if key in given and str(given[key]) != str(value):
                flag = "--" + key.replace("_", "-")
                raise RobnetError(f"{flag} {value} and --perturbation-option {key}={given[key]} set the same "
                                  "option to different values; give one of them")
            given[key] = value
        return given


#: Options with a flag of their own (``--order`` ...) that set the perturbation option of that name.
SHORTHANDS = ("order", "mode", "coef_scale")
