"""A conditional Wasserstein GAN with gradient penalty over tabular rows (Gulrajani et al., NeurIPS 2017).

It learns the distribution of user feature rows (numeric and categorical columns) given a binary
condition column (the purchase label), and generates synthetic users for sharing outside the team and
for oversampling buyers: ``TabularGAN.sample(n, condition)`` returns rows in the fitted frame's schema.

Rows are encoded reversibly before training:

* numeric columns by a randomised quantile transform to a standard normal: the value's empirical CDF
  position (a tied value, such as the many zero counts, gets a uniform position inside its tie's CDF
  step) through the inverse normal CDF. The user features are zero-inflated, heavy-tailed counts;
  log1p + standardising would leave a spike at zero and a long tail that a smooth generator smears
  into negative and fractional counts, and the critic would win on that spike alone. Here every column
  is exactly N(0, 1) for the networks, and the inverse (normal CDF, then the column's quantiles)
  lands inside the range seen in training: counts stay >= 0, integers are rounded back;
* categorical columns one-hot; the generator emits logits per column, passed through Gumbel-softmax
  while training (so the critic sees near-one-hot rows and the gradient flows) and sampled from their
  softmax when generating, so only categories seen in training come out;
* the condition one-hot, fed to both the generator and the critic.

Training by sampling: each batch draws its conditions with equal probability (not the data's ratio)
and pairs every condition with real rows of that class, so the minority class (buyers) is learned as
well as the majority. An epoch is ``ceil(rows / batch_size)`` generator steps, each after ``n_critic``
critic steps (CTGAN's meaning of epoch when its ``discriminator_steps`` equals ``n_critic``).

The GAN is not a next-item model: it has ``fit`` / ``sample`` instead of ``loss`` / ``score`` /
``predict``. Its quality is measured by :mod:`shopsight.training.synthetic_users.evaluate`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.nn import functional as F

# ShopsightError in the platform; ValueError where a registered GAN's code is loaded alone
from shopsight.training._errors import user_error as _error

__all__ = ["GANConfig", "TabularGAN"]


@dataclass(frozen=True)
class GANConfig:
    """Hyperparameters of the conditional WGAN-GP."""

    noise_dim: int = 64
    generator_hidden: tuple[int, ...] = (256, 256)
    critic_hidden: tuple[int, ...] = (256, 256)
    lr_generator: float = 2e-4
    lr_critic: float = 2e-4
    betas: tuple[float, float] = (0.5, 0.9)  # WGAN-GP's Adam betas
    weight_decay: float = 1e-6
    n_critic: int = 5  # critic steps per generator step
    gp_weight: float = 10.0  # lambda of the gradient penalty
    pac: int = 1  # rows the critic judges together (PacGAN); batch_size must be a multiple
    critic_dropout: float = 0.0
    gumbel_tau: float = 0.2
    batch_size: int = 500
    epochs: int = 100
    balance_condition: bool = True  # training by sampling: conditions drawn 50/50, not at the data's ratio
    quantiles: int = 1000  # grid of the numeric transform
    seed: int = 0
    device: str = "cpu"
    log_every: int = 1  # epochs between progress lines

    def __post_init__(self) -> None:
        if min(self.noise_dim, self.batch_size, self.epochs, self.n_critic, self.pac, self.log_every) < 1:
            raise ValueError("noise_dim, batch_size, epochs, n_critic, pac and log_every must be positive")
        if self.batch_size % self.pac:
            raise ValueError(f"batch_size {self.batch_size} is not a multiple of pac {self.pac}")
        widths = (*self.generator_hidden, *self.critic_hidden)
        if not self.generator_hidden or not self.critic_hidden or min(widths) < 1:
            raise ValueError("generator_hidden and critic_hidden need at least one positive width")
        if self.quantiles < 2:
            raise ValueError("quantiles must be at least 2")
        if not 0 <= self.critic_dropout < 1:
            raise ValueError("critic_dropout must be in [0, 1)")


class _QuantileNormal:
    """Reversible numeric transform: value -> empirical CDF position -> standard normal, and back."""

    def __init__(self, levels: np.ndarray, values: np.ndarray) -> None:
        self.levels = levels  # (K,) 0..1, strictly increasing
        self.values = values  # (K,) the column's quantiles at those levels, non-decreasing

    @classmethod
    def fit(cls, column: np.ndarray, k: int) -> _QuantileNormal:
        levels = np.linspace(0.0, 1.0, min(k, max(2, len(column))))
        return cls(levels, np.quantile(column, levels))

    def cdf_bounds(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Lower and upper CDF position of each value: equal, except for a value sitting on a tie."""
        q, lv = self.values, self.levels
        left = np.searchsorted(q, x, side="left")
        right = np.searchsorted(q, x, side="right")
        tied = right > left
        inner = np.clip(left, 1, len(q) - 1)
        lo_q, hi_q = q[inner - 1], q[inner]
        span = np.where(hi_q > lo_q, hi_q - lo_q, 1.0)
        between = lv[inner - 1] + (lv[inner] - lv[inner - 1]) * np.clip((x - lo_q) / span, 0.0, 1.0)
        lower = np.where(tied, lv[np.clip(left, 0, len(q) - 1)], between)
        upper = np.where(tied, lv[np.clip(right - 1, 0, len(q) - 1)], between)
        return lower, upper

    def inverse(self, z: np.ndarray) -> np.ndarray:
        from scipy.special import ndtr

        return np.interp(ndtr(z), self.levels, self.values)


def _floats(column: pd.Series) -> np.ndarray:
    """A numeric column as float64, missing values (NaN, None, pd.NA) as NaN."""
    return column.to_numpy(dtype=np.float64, na_value=np.nan)


def _to_normal(lower: torch.Tensor, upper: torch.Tensor) -> torch.Tensor:
    """Standard-normal values (B, n_num) from CDF bounds (B, n_num)."""
    # a fresh uniform position inside each tie every time: discrete columns look continuous to the critic
    u = lower + (upper - lower) * torch.rand(lower.shape, device=lower.device)
    return torch.special.ndtri(u.clamp(1e-4, 1 - 1e-4))


class _Residual(nn.Module):
    """Linear, BatchNorm, ReLU, and the input concatenated back (CTGAN's generator block)."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.fc = nn.Linear(d_in, d_out)
        self.bn = nn.BatchNorm1d(d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, d_in) -> (B, d_out + d_in)
        return torch.cat([F.relu(self.bn(self.fc(x))), x], dim=1)


class _Generator(nn.Module):
    def __init__(self, cfg: GANConfig, n_cond: int, data_dim: int) -> None:
        super().__init__()
        width = cfg.noise_dim + n_cond
        blocks = []
        for hidden in cfg.generator_hidden:
            blocks.append(_Residual(width, hidden))
            width += hidden
        self.body = nn.Sequential(*blocks)
        self.out = nn.Linear(width, data_dim)

    def forward(self, noise: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        # noise: (B, Z), cond: (B, C) -> raw outputs (B, data_dim): numeric values, then category logits
        return self.out(self.body(torch.cat([noise, cond], dim=1)))


class _Critic(nn.Module):
    def __init__(self, cfg: GANConfig, n_cond: int, data_dim: int) -> None:
        super().__init__()
        self.pac = cfg.pac
        width = (data_dim + n_cond) * cfg.pac
        layers: list[nn.Module] = []
        for hidden in cfg.critic_hidden:
            # no batch norm: the gradient penalty is per sample, batch statistics would couple samples
            layers += [nn.Linear(width, hidden), nn.LeakyReLU(0.2), nn.Dropout(cfg.critic_dropout)]
            width = hidden
        layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, rows: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        # rows: (B, data_dim), cond: (B, C) -> scores (B / pac,)
        x = torch.cat([rows, cond], dim=1)
        return self.net(x.reshape(-1, x.shape[1] * self.pac)).squeeze(1)


class TabularGAN:
    """Conditional WGAN-GP over a pandas frame: ``fit`` on real rows, ``sample`` synthetic ones."""

    def __init__(self, cfg: GANConfig | None = None) -> None:
        self.cfg = cfg or GANConfig()
        self.schema: dict[str, Any] | None = None
        self.generator: _Generator | None = None
        self.critic: _Critic | None = None

    # ----- schema and transforms -------------------------------------------------------------

    def _check_frame(
        self, frame: pd.DataFrame, condition: str, numeric: Sequence[str], categorical: Sequence[str]
    ) -> None:
        if not isinstance(frame, pd.DataFrame):
            raise _error(f"the GAN fits a pandas DataFrame, not {type(frame).__name__}")
        if frame.empty:
            raise _error("cannot fit the GAN on an empty frame")
        if not numeric and not categorical:
            raise _error("the GAN needs at least one numeric or categorical column")
        named = [*numeric, *categorical, condition]
        missing = [c for c in named if c not in frame.columns]
        if missing:
            raise _error(f"the frame lacks column(s) {', '.join(map(repr, missing))}")
        if len(set(named)) < len(named):
            raise _error("a column is named twice among numeric, categorical and the condition")
        for c in [*categorical, condition]:
            if frame[c].isna().any():
                missing_values = int(frame[c].isna().sum())
                raise _error(f"column {c!r} has {missing_values} missing values; fill or drop them")
        for c in numeric:
            if frame[c].isna().all():
                raise _error(f"numeric column {c!r} has no values, only missing ones")
        for c in numeric:
            dtype = frame[c].dtype
            if pd.api.types.is_bool_dtype(dtype) or not pd.api.types.is_numeric_dtype(dtype):
                raise _error(f"numeric column {c!r} has dtype {dtype}; list it as categorical")
        values = pd.unique(frame[condition])
        if len(values) != 2:
            shown = ", ".join(map(repr, sorted(values.tolist(), key=str)[:5]))
            raise _error(
                f"condition column {condition!r} must have exactly two values, found {len(values)}: {shown}"
            )

    def _build_schema(
        self, frame: pd.DataFrame, condition: str, numeric: Sequence[str], categorical: Sequence[str]
    ) -> dict[str, Any]:
        numeric_spec, categorical_spec = [], []
        for c in numeric:
            column = _floats(frame[c])
            qn = _QuantileNormal.fit(column[~np.isnan(column)], self.cfg.quantiles)
            numeric_spec.append(
                {
                    "name": c,
                    "dtype": str(frame[c].dtype),
                    "integer": bool(pd.api.types.is_integer_dtype(frame[c].dtype)),
                    "levels": torch.as_tensor(qn.levels),
                    "values": torch.as_tensor(qn.values),
                }
            )
            if np.isnan(column).any():
                # whether the value is missing is a category of its own (hours since a first purchase
                # that never happened); the network sees it one-hot, _decode turns it back into NaN
                categorical_spec.append(
                    {"name": f"{c} is missing", "dtype": "bool", "levels": [False, True], "categories": None,
                     "missing_of": c}
                )  # fmt: skip
        for c in categorical:
            dtype = frame[c].dtype
            seen = sorted(pd.unique(frame[c]).tolist(), key=lambda v: (str(type(v)), v))
            categorical_spec.append(
                {
                    "name": c,
                    "dtype": str(dtype),
                    "levels": seen,
                    # a category dtype keeps its full category list, seen or not
                    "categories": dtype.categories.tolist()
                    if isinstance(dtype, pd.CategoricalDtype)
                    else None,
                }
            )
        cond_values = sorted(pd.unique(frame[condition]).tolist(), key=lambda v: (str(type(v)), v))
        counts = frame[condition].value_counts()
        return {
            "columns": list(frame.columns.intersection([*numeric, *categorical, condition], sort=False)),
            "numeric": numeric_spec,
            "categorical": categorical_spec,
            "condition": {
                "name": condition,
                "dtype": str(frame[condition].dtype),
                "values": cond_values,
                "prior": [float(counts[v] / len(frame)) for v in cond_values],
            },
        }

    @property
    def _data_dim(self) -> int:
        assert self.schema is not None
        return len(self.schema["numeric"]) + sum(len(s["levels"]) for s in self.schema["categorical"])

    def _encode(self, frame: pd.DataFrame) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """CDF bounds, lower and upper (N, n_num) each; one-hot categories (N, levels); condition (N,)."""
        assert self.schema is not None
        lowers, uppers = [], []
        for spec in self.schema["numeric"]:
            qn = _QuantileNormal(spec["levels"].numpy(), spec["values"].numpy())
            column = _floats(frame[spec["name"]])
            missing = np.isnan(column)
            lo, hi = qn.cdf_bounds(np.where(missing, spec["values"][0].item(), column))
            # a missing value's position is anywhere in 0..1: noise the generator need not match
            lowers.append(np.where(missing, 0.0, lo))
            uppers.append(np.where(missing, 1.0, hi))
        n = len(frame)
        lower = torch.as_tensor(np.column_stack(lowers) if lowers else np.empty((n, 0)), dtype=torch.float32)
        upper = torch.as_tensor(np.column_stack(uppers) if uppers else np.empty((n, 0)), dtype=torch.float32)
        onehots = []
        for spec in self.schema["categorical"]:
            values = frame[spec["missing_of"]].isna() if "missing_of" in spec else frame[spec["name"]]
            codes = pd.Categorical(values, categories=spec["levels"]).codes
            onehots.append(np.eye(len(spec["levels"]), dtype=np.float32)[codes])
        onehot = torch.as_tensor(np.hstack(onehots) if onehots else np.empty((n, 0), dtype=np.float32))
        spec = self.schema["condition"]
        cond = pd.Categorical(frame[spec["name"]], categories=spec["values"])
        return lower, upper, onehot, torch.as_tensor(cond.codes.astype(np.int64))

    def _activate(
        self, raw: torch.Tensor, hard: bool, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Generator outputs -> row encoding: numeric as is, each categorical block soft- or hard-one-hot."""
        assert self.schema is not None
        n_num = len(self.schema["numeric"])
        parts = [raw[:, :n_num]]
        start = n_num
        for spec in self.schema["categorical"]:
            logits = raw[:, start : start + len(spec["levels"])]  # (B, L)
            if hard:
                picked = torch.multinomial(F.softmax(logits, dim=1), 1, generator=generator).squeeze(1)
                parts.append(F.one_hot(picked, len(spec["levels"])).to(raw.dtype))
            else:
                parts.append(F.gumbel_softmax(logits, tau=self.cfg.gumbel_tau, hard=False))
            start += len(spec["levels"])
        return torch.cat(parts, dim=1)  # (B, data_dim)

    # ----- training ------------------------------------------------------------------------------

    def fit(
        self,
        frame: pd.DataFrame,
        condition_column: str,
        *,
        numeric: Sequence[str] = (),
        categorical: Sequence[str] = (),
        log: Callable[[str], None] | None = print,
        resume: dict[str, Any] | None = None,
        on_epoch: Callable[[dict[str, float], dict[str, Any]], None] | None = None,
    ) -> list[dict[str, float]]:
        """Train on ``frame`` from scratch (an earlier fit is replaced), or resume an interrupted fit.

        Args:
            frame: real rows; other columns than those named are ignored.
            condition_column: the binary column to condition on (exactly two distinct values).
            numeric: numeric columns (ints stay ints when sampled, and within the seen range).
            categorical: categorical columns of any dtype (sampled only from the seen values).
            log: where progress lines go (one every ``log_every`` epochs); None for silence.
            resume: a training state that ``on_epoch`` received: training continues after its epoch
                with its weights, optimizer moments and random generators, so an interrupted fit
                resumed on the same frame ends with the weights of an uninterrupted one.
            on_epoch: called after every epoch with the epoch's entry (below) and the training state
                (plain types and tensors: save it with ``torch.save`` before the next epoch changes it).

        Returns:
            one dict per epoch run by this call: ``epoch``, ``critic_loss`` (mean of fake - real + penalty),
            ``generator_loss`` (minus the critic's mean score of fakes), ``wasserstein`` (the critic's
            mean score of real rows minus that of fakes: its estimate of the distance), ``seconds``.

        Raises:
            ShopsightError: an empty frame, a missing or repeated column, missing values outside the
                numeric columns, a non-numeric "numeric" column, a condition column without exactly two
                values, or a ``resume`` state of other columns.
        """
        numeric, categorical = list(numeric), list(categorical)
        self._check_frame(frame, condition_column, numeric, categorical)
        cfg = self.cfg
        device = torch.device(cfg.device)
        fork = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=fork):  # seeded dropout and Gumbel noise, global state untouched
            torch.manual_seed(cfg.seed)
            return self._fit(frame, condition_column, numeric, categorical, log, device, resume, on_epoch)

    def _fit(
        self, frame, condition_column, numeric, categorical, log, device, resume, on_epoch
    ) -> list[dict[str, float]]:
        cfg = self.cfg
        self.schema = self._build_schema(frame, condition_column, numeric, categorical)
        if resume is not None and resume["gan"]["schema"]["columns"] != self.schema["columns"]:
            raise _error(
                f"cannot resume: the saved fit had columns {resume['gan']['schema']['columns']}, "
                f"this frame {self.schema['columns']}"
            )
        lower, upper, onehot, cond_index = (t.to(device) for t in self._encode(frame))
        n_cond = len(self.schema["condition"]["values"])
        data_dim = self._data_dim
        self.generator = _Generator(cfg, n_cond, data_dim).to(device)
        self.critic = _Critic(cfg, n_cond, data_dim).to(device)
        opt_g = torch.optim.Adam(
            self.generator.parameters(), lr=cfg.lr_generator, betas=cfg.betas, weight_decay=cfg.weight_decay
        )
        opt_c = torch.optim.Adam(
            self.critic.parameters(), lr=cfg.lr_critic, betas=cfg.betas, weight_decay=cfg.weight_decay
        )
        rng = torch.Generator(device="cpu").manual_seed(cfg.seed)
        start_epoch = 0
        if resume is not None:
            self.generator.load_state_dict(resume["gan"]["generator"])
            self.critic.load_state_dict(resume["gan"]["critic"])
            opt_g.load_state_dict(resume["optimizers"]["generator"])
            opt_c.load_state_dict(resume["optimizers"]["critic"])
            rng.set_state(resume["rng"]["sampling"])
            torch.set_rng_state(resume["rng"]["torch"])
            if device.type == "cuda" and resume["rng"].get("cuda") is not None:
                torch.cuda.set_rng_state(resume["rng"]["cuda"], device)
            start_epoch = int(resume["epoch"])
        by_class = [torch.nonzero(cond_index.cpu() == k).squeeze(1) for k in range(n_cond)]  # (N_k,) each
        prior = (
            torch.full((n_cond,), 1.0 / n_cond)
            if cfg.balance_condition
            else torch.tensor(self.schema["condition"]["prior"])
        )
        batch = cfg.batch_size
        steps = max(1, math.ceil(len(frame) / batch))

        def real_batch() -> tuple[torch.Tensor, torch.Tensor]:
            classes = torch.multinomial(prior, batch, replacement=True, generator=rng)  # (B,)
            rows = torch.empty(batch, dtype=torch.long)
            for k in range(n_cond):
                chosen = classes == k
                pool = by_class[k]
                rows[chosen] = pool[torch.randint(len(pool), (int(chosen.sum()),), generator=rng)]
            rows = rows.to(device)
            numeric_z = _to_normal(lower[rows], upper[rows])  # (B, n_num)
            cond = F.one_hot(classes.to(device), n_cond).float()  # (B, C)
            return torch.cat([numeric_z, onehot[rows]], dim=1), cond  # (B, data_dim), (B, C)

        def fake_batch(cond: torch.Tensor) -> torch.Tensor:
            noise = torch.randn(len(cond), cfg.noise_dim, device=device)  # (B, Z)
            return self._activate(self.generator(noise, cond), hard=False)  # (B, data_dim)

        history = []
        for epoch in range(start_epoch + 1, cfg.epochs + 1):
            started = time.perf_counter()
            self.generator.train()
            self.critic.train()
            sums = torch.zeros(3, device=device)  # critic loss, generator loss, wasserstein
            for _ in range(steps):
                for _ in range(cfg.n_critic):
                    real, cond = real_batch()
                    with torch.no_grad():
                        fake = fake_batch(cond)
                    real_score = self.critic(real, cond).mean()
                    fake_score = self.critic(fake, cond).mean()
                    penalty = self._gradient_penalty(real, fake, cond)
                    loss_c = fake_score - real_score + cfg.gp_weight * penalty
                    opt_c.zero_grad(set_to_none=True)
                    loss_c.backward()
                    opt_c.step()
                    sums[0] += loss_c.detach() / cfg.n_critic
                    sums[2] += (real_score - fake_score).detach() / cfg.n_critic
                _, cond = real_batch()
                loss_g = -self.critic(fake_batch(cond), cond).mean()
                opt_g.zero_grad(set_to_none=True)
                loss_g.backward()
                opt_g.step()
                sums[1] += loss_g.detach()
            critic_loss, generator_loss, wasserstein = (sums / steps).tolist()
            entry = {
                "epoch": float(epoch),
                "critic_loss": critic_loss,
                "generator_loss": generator_loss,
                "wasserstein": wasserstein,
                "seconds": time.perf_counter() - started,
            }
            history.append(entry)
            if log is not None and (epoch % cfg.log_every == 0 or epoch in (1, cfg.epochs)):
                log(
                    f"gan epoch {epoch}/{cfg.epochs}  critic {critic_loss:.4f}  "
                    f"generator {generator_loss:.4f}  wasserstein {wasserstein:.4f}  {entry['seconds']:.1f} s"
                )
            if on_epoch is not None:
                state = {
                    "epoch": epoch,
                    "gan": self.state_dict(),
                    "optimizers": {"generator": opt_g.state_dict(), "critic": opt_c.state_dict()},
                    "rng": {
                        "sampling": rng.get_state(),
                        "torch": torch.get_rng_state(),
                        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                    },
                }
                on_epoch(entry, state)
        return history

    def _gradient_penalty(self, real: torch.Tensor, fake: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Mean of (||grad critic(x)|| - 1)^2 at points between real and fake rows (one mix per pack)."""
        pac = self.cfg.pac
        alpha = torch.rand(len(real) // pac, 1, 1, device=real.device)  # (B/pac, 1, 1)
        alpha = alpha.expand(-1, pac, 1).reshape(-1, 1)  # (B, 1)
        mixed = (alpha * real + (1 - alpha) * fake).requires_grad_(True)
        score = self.critic(mixed, cond)  # (B/pac,)
        (grad,) = torch.autograd.grad(score.sum(), mixed, create_graph=True)  # (B, data_dim)
        norms = grad.reshape(-1, pac * grad.shape[1]).norm(2, dim=1)  # (B/pac,)
        return ((norms - 1) ** 2).mean()

    # ----- generation ----------------------------------------------------------------------------

    def sample(self, n: int, condition: Any = None, *, seed: int | None = None) -> pd.DataFrame:
        """``n`` synthetic rows with the fitted frame's columns (in its order) and dtypes.

        Args:
            n: number of rows.
            condition: one of the condition column's two values for every row, a sequence of ``n``
                such values, or None to draw them at the training data's ratio.
            seed: makes the draw reproducible; None draws from the global generator.

        Raises:
            ShopsightError: before ``fit``, a negative ``n``, or an unknown condition value.
        """
        if self.schema is None or self.generator is None:
            raise _error("the GAN is not fitted: call fit() or load() first")
        if not isinstance(n, int | np.integer) or n < 0:
            raise _error(f"n must be a non-negative integer, not {n!r}")
        spec = self.schema["condition"]
        values = spec["values"]
        if condition is None:
            draw = np.random.default_rng(seed).choice(len(values), size=n, p=spec["prior"])
        else:
            wanted = [condition] * n if np.ndim(condition) == 0 else list(condition)
            if len(wanted) != n:
                raise _error(f"condition has {len(wanted)} values for {n} rows")
            unknown = [v for v in wanted if v not in values]
            if unknown:
                raise _error(f"unknown condition {unknown[0]!r} for {spec['name']!r}: choose one of {values}")
            draw = np.array([values.index(v) for v in wanted], dtype=np.int64)
        device = next(self.generator.parameters()).device
        rng = torch.Generator(device=device)
        if seed is None:
            rng.seed()
        else:
            rng.manual_seed(seed)
        self.generator.eval()
        with torch.no_grad():
            cond = F.one_hot(torch.as_tensor(draw, device=device), len(values)).float()  # (n, C)
            noise = torch.randn(n, self.cfg.noise_dim, generator=rng, device=device)  # (n, Z)
            rows = self._activate(self.generator(noise, cond), hard=True, generator=rng).cpu().numpy()
        return self._decode(rows, draw)

    def _decode(self, rows: np.ndarray, draw: np.ndarray) -> pd.DataFrame:
        assert self.schema is not None
        out: dict[str, Any] = {}
        for i, spec in enumerate(self.schema["numeric"]):
            qn = _QuantileNormal(spec["levels"].numpy(), spec["values"].numpy())
            values = qn.inverse(rows[:, i].astype(np.float64))
            if spec["integer"]:
                values = np.rint(values)
            out[spec["name"]] = pd.Series(values).astype(spec["dtype"])
        start = len(self.schema["numeric"])
        for spec in self.schema["categorical"]:
            width = len(spec["levels"])
            picked = [spec["levels"][k] for k in rows[:, start : start + width].argmax(axis=1)]
            start += width
            if "missing_of" in spec:
                name = spec["missing_of"]
                column = out[name].astype(np.float64).where(~np.array(picked, dtype=bool))
                dtype = pd.api.types.pandas_dtype(
                    next(n["dtype"] for n in self.schema["numeric"] if n["name"] == name)
                )
                out[name] = column.astype(dtype) if pd.api.types.is_extension_array_dtype(dtype) else column
            else:
                out[spec["name"]] = self._restore(picked, spec)
        cond = self.schema["condition"]
        out[cond["name"]] = self._restore([cond["values"][k] for k in draw], cond)
        return pd.DataFrame(out, columns=self.schema["columns"])

    @staticmethod
    def _restore(values: list, spec: dict) -> pd.Series:
        if spec.get("categories") is not None:
            return pd.Series(pd.Categorical(values, categories=spec["categories"]))
        return pd.Series(values, dtype=spec["dtype"] if spec["dtype"] != "object" else object)

    # ----- persistence -----------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Config, schema (transforms, categories) and network weights: plain types and tensors only."""
        if self.schema is None or self.generator is None or self.critic is None:
            raise _error("the GAN is not fitted: nothing to save")
        return {
            "config": asdict(self.cfg),
            "schema": self.schema,
            "generator": self.generator.state_dict(),
            "critic": self.critic.state_dict(),
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> TabularGAN:
        """The GAN that ``state_dict`` described, ready to ``sample``."""
        config = dict(state["config"])
        for key in ("generator_hidden", "critic_hidden", "betas"):
            config[key] = tuple(config[key])
        gan = cls(GANConfig(**config))
        gan.schema = state["schema"]
        n_cond = len(gan.schema["condition"]["values"])
        gan.generator = _Generator(gan.cfg, n_cond, gan._data_dim)
        gan.critic = _Critic(gan.cfg, n_cond, gan._data_dim)
        gan.generator.load_state_dict(state["generator"])
        gan.critic.load_state_dict(state["critic"])
        device = torch.device(gan.cfg.device if torch.cuda.is_available() else "cpu")
        gan.generator.to(device)
        gan.critic.to(device)
        return gan

    def save(self, path: Path | str) -> Path:
        """Write ``state_dict`` with ``torch.save``; returns the path."""
        path = Path(path)
        torch.save(self.state_dict(), path)
        return path

    @classmethod
    def load(cls, path: Path | str) -> TabularGAN:
        """Read a GAN written by ``save`` (weights-only unpickling: no code runs from the file)."""
        return cls.from_state_dict(torch.load(Path(path), map_location="cpu", weights_only=True))
