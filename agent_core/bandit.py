"""The style bandit's arithmetic: Bayesian linear Thompson sampling over reply styles.

No I/O here: :mod:`agent_core.policy` feeds it from the database, ``bench/learning.py``
from simulated users.

Model. A reply's reward ``y`` in [-1, 1] is ``x(style, context) · w + noise``. The features
``x`` are an intercept, one ±1 entry per style dimension (+1 for the first value:
brief, casual, none, prose), and the same four entries again for the message's context
(question, task, chat), so a context may pull a dimension its own way. Each user has
their own ``w``.

Sharing. The population mean is the average of users' own tastes (a random-effects fit
over everyone's data, :meth:`StyleBandit.average_taste`), so a new user starts from what
people like; the broad prior ``N(population mean, S0)`` lets them differ (less
for the context terms, which need evidence to matter).

Drift. A user's data statistics are discounted by ``gamma`` per new observation, so old
reactions fade and the prior (weight 1, never discounted) fills in: a user whose taste
changes is followed within a few dozen reactions.

Groups. Beyond the average, the population holds prototypes: the tastes of groups of
similar users, fitted as a mixture of regressions over everyone's reactions. A user's
prior is a mixture: one narrow component per prototype, and a broad one for tastes
nobody has shown yet; their reactions shift the weight to the groups they resemble.

Choice. See :meth:`StyleBandit.choose`: explore (a tempered Thompson draw) with the
probability that the user is like nobody known, else take the best style for the groups
they resemble. The probability of the choice is estimated and logged, so later policies
can be evaluated offline on real logs.
"""

from __future__ import annotations

import functools
import itertools
import math
import zlib
from dataclasses import dataclass, field

import numpy as np

from agent_core.style import DIMENSIONS, Style

CONTEXTS = ("question", "task", "chat")
DIMS = tuple(DIMENSIONS)
N_FEATURES = 1 + len(DIMS) * (1 + len(CONTEXTS))
ALL_STYLES: tuple[Style, ...] = tuple(
    Style.from_dict(dict(zip(DIMS, values, strict=True))) for values in itertools.product(*DIMENSIONS.values())
)


@dataclass(frozen=True)
class BanditConfig:
    noise_var: float = 1.0  # variance of a reward around its mean
    prior_sd_intercept: float = 1.0
    prior_sd_main: float = 0.5  # the broad prior: how far a taste may be from the population's
    prior_sd_context: float = 0.2  # ...and how far a context may move it
    near_sd_intercept: float = 0.25  # a prototype's spread: how far a user may be from people like them
    near_sd_main: float = 0.15
    near_sd_context: float = 0.08
    broad_weight: float = 0.05  # prior weight of "unlike anyone seen so far" once there are prototypes
    explore_scale: float = 0.05  # posterior variance scale of the draws that explore an unknown taste
    explore_after: float = 3.0  # reactions after which a user is explored for half as much as at full
    population_ridge: float = 5.0  # shrinks the population fit toward "no preference" when data is scarce
    prototype_min_obs: int = 5  # reactions a user needs before their taste counts in the population's groups
    prototype_min_users: int = 8  # users that must be known before they are grouped (4 per group)
    max_prototypes: int = 512  # the best-known users' tastes that are grouped into prototypes
    clusters: int = 8  # at most this many prototypes: groups of users with similar tastes
    em_sharpness: float = 1.0  # >1 assigns users to groups more decisively when fitting them
    gamma: float = 0.96  # per-observation discount of a user's data (drift)
    evidence_gamma: float = 0.98  # the same, when telling which group a user resembles
    population_gamma: float = 0.995  # the same, when fitting what groups of users like
    samples: int = 512  # posterior draws that estimate how likely each style is to be chosen

    def precision(self, sd_intercept: float, sd_main: float, sd_context: float) -> np.ndarray:
        sds = [sd_intercept] + [sd_main] * len(DIMS) + [sd_context] * (len(DIMS) * len(CONTEXTS))
        return np.diag(1.0 / np.square(sds))


TABLE_SEED = 20261129  # the draws that estimate choice probabilities: fixed, so they are reproducible


def features(style: Style, context: str) -> np.ndarray:
    signs = np.array([1.0 if getattr(style, d) == DIMENSIONS[d][0] else -1.0 for d in DIMS])
    x = np.zeros(N_FEATURES)
    x[0] = 1.0
    x[1 : 1 + len(DIMS)] = signs
    c = CONTEXTS.index(context) if context in CONTEXTS else CONTEXTS.index("chat")
    start = 1 + len(DIMS) * (1 + c)
    x[start : start + len(DIMS)] = signs
    return x


@dataclass(frozen=True)
class Realisation:
    """How often a requested value shows in the reply's text, per dimension and value:
    ``rates[j, 0]`` is the chance that asking for dimension ``j``'s first value gives a
    reply with it, ``rates[j, 1]`` the same for its second value.

    The reward model is linear in the observed style's ±1 signs, so the expected reward
    of a *request* is the reward model applied to its expected signs, ``2q - 1`` for a
    first value realised with chance ``q`` and ``1 - 2q`` for a second one (dimensions
    realised independently). Choosing over those expected features picks the request
    that pays best in what the user will see."""

    rates: np.ndarray = field(default_factory=lambda: np.ones((len(DIMS), 2)))

    @classmethod
    def from_counts(cls, asked: np.ndarray, shown: np.ndarray, prior: float = 2.0, prior_rate: float = 0.9
                    ) -> Realisation:  # fmt: skip
        """From counts per (dimension, value): ``asked`` requests, ``shown`` of them realised;
        a prior of ``prior`` pseudo-replies realised at ``prior_rate`` (the backend means to
        realise what it is asked), which a few dozen replies outweigh."""
        return cls((shown + prior * prior_rate) / (asked + prior))

    @property
    def key(self) -> bytes:
        return np.round(self.rates, 3).tobytes()

    def signs(self) -> np.ndarray:
        """(16, 4): each style's expected sign per dimension when it is requested."""
        first = self.rates[:, 0] * 2 - 1  # asked first value: E[sign]
        second = 1 - 2 * self.rates[:, 1]  # asked second value: E[sign]
        return np.where(_STYLE_SIGNS > 0, first[None, :], second[None, :])

    def expected_features(self, context: str) -> np.ndarray:
        """(16, F): the expected features of the reply to each requested style."""
        signs = self.signs()
        x = np.zeros((len(ALL_STYLES), N_FEATURES))
        x[:, 0] = 1.0
        x[:, 1 : 1 + len(DIMS)] = signs
        c = CONTEXTS.index(context) if context in CONTEXTS else CONTEXTS.index("chat")
        start = 1 + len(DIMS) * (1 + c)
        x[:, start : start + len(DIMS)] = signs
        return x


PERFECT = Realisation()


@dataclass
class RealisationCounts:
    """Per (dimension, value): how many replies asked for it (``asked``) and how many of
    those have it in their text (``shown``); a moving window of at most ``window``
    replies (older counts are halved when it is full)."""

    asked: np.ndarray = field(default_factory=lambda: np.zeros((len(DIMS), 2)))
    shown: np.ndarray = field(default_factory=lambda: np.zeros((len(DIMS), 2)))
    window: float = float("inf")

    def add(self, requested: Style, observed: Style, count: float = 1) -> None:
        for j, dim in enumerate(DIMS):
            v = DIMENSIONS[dim].index(getattr(requested, dim))
            self.asked[j, v] += count
            self.shown[j, v] += count * (getattr(observed, dim) == getattr(requested, dim))
        if self.asked[0].sum() > self.window:
            self.asked *= 0.5
            self.shown *= 0.5

    def estimate(self) -> Realisation:
        return Realisation.from_counts(self.asked, self.shown)

    def table(self) -> dict[str, dict[str, tuple[int, int]]]:
        """``{dimension: {value: (asked, shown)}}``, for people to read."""
        return {dim: {value: (int(self.asked[j, v]), int(self.shown[j, v])) for v, value in enumerate(values)}
                for j, (dim, values) in enumerate(DIMENSIONS.items())}  # fmt: skip


RECENT = 100  # observations kept as they were, for telling groups apart exactly
_STYLE_SIGNS = np.array([features(s, "chat")[1 : 1 + len(DIMS)] for s in ALL_STYLES])  # (16, 4) of ±1
_FEATURES = {c: np.array([features(s, c) for s in ALL_STYLES]) for c in CONTEXTS}  # context -> (16, F)


def _allowed(fixed: dict[str, str]) -> np.ndarray:
    """Indices of the styles that agree with the user's fixed values."""
    return _allowed_for(tuple(sorted(fixed.items())))


@functools.lru_cache(maxsize=256)
def _allowed_for(fixed_items: tuple[tuple[str, str], ...]) -> np.ndarray:
    fixed = dict(fixed_items)
    mask = np.ones(len(ALL_STYLES), dtype=bool)
    for j, dim in enumerate(DIMS):
        if dim in fixed:
            mask &= _STYLE_SIGNS[:, j] == (1.0 if fixed[dim] == DIMENSIONS[dim][0] else -1.0)
    return np.flatnonzero(mask)


@dataclass
class UserStats:
    """What a user's reactions say, as discounted sufficient statistics.

    ``D = Σ gamma^k x xᵀ / σ²`` and ``d = Σ gamma^k x y / σ²`` with the user's discount,
    for their own posterior (a changed taste shows quickly); ``Dp``, ``dp`` the same with
    the population's milder discount, for fitting groups (early, exploring reactions are
    the ones that tell styles apart, and must not fade); and the last ``RECENT``
    observations themselves."""

    D: np.ndarray = field(default_factory=lambda: np.zeros((N_FEATURES, N_FEATURES)))
    d: np.ndarray = field(default_factory=lambda: np.zeros(N_FEATURES))
    n: int = 0  # observations seen (undiscounted count)
    X: np.ndarray = field(default_factory=lambda: np.zeros((0, N_FEATURES)))  # recent features, oldest first
    y: np.ndarray = field(default_factory=lambda: np.zeros(0))  # their rewards
    Dp: np.ndarray = field(default_factory=lambda: np.zeros((N_FEATURES, N_FEATURES)))
    dp: np.ndarray = field(default_factory=lambda: np.zeros(N_FEATURES))

    def observe(self, x: np.ndarray, y: float, config: BanditConfig) -> None:
        self.D = config.gamma * self.D + np.outer(x, x) / config.noise_var
        self.d = config.gamma * self.d + x * y / config.noise_var
        self.Dp = config.population_gamma * self.Dp + np.outer(x, x) / config.noise_var
        self.dp = config.population_gamma * self.dp + x * y / config.noise_var
        self.n += 1
        self.X = np.vstack([self.X, x])[-RECENT:]
        self.y = np.append(self.y, y)[-RECENT:]

    @classmethod
    def replay(cls, X: np.ndarray, y: np.ndarray, config: BanditConfig) -> UserStats:
        """The statistics after observing the rows of ``X`` (oldest first) with rewards
        ``y``, in one pass of matrix products: what :meth:`observe` on each in turn gives."""
        n = len(y)
        if n == 0:
            return cls()
        age = np.arange(n - 1, -1, -1, dtype=float)
        w, wp = config.gamma**age / config.noise_var, config.population_gamma**age / config.noise_var
        return cls(D=(X * w[:, None]).T @ X, d=X.T @ (w * y), n=n, X=X[-RECENT:].copy(), y=y[-RECENT:].copy(),
                   Dp=(X * wp[:, None]).T @ X, dp=X.T @ (wp * y))  # fmt: skip

    def to_bytes(self) -> bytes:
        parts = [[self.n, len(self.y)], self.D.ravel(), self.d, self.Dp.ravel(), self.dp, self.X.ravel(), self.y]
        return np.concatenate([np.asarray(p, dtype="<f8") for p in parts]).tobytes()

    @classmethod
    def from_bytes(cls, blob: bytes) -> UserStats:
        v = np.frombuffer(blob, dtype="<f8")
        k, n, m = N_FEATURES, int(v[0]), int(v[1])
        arrays, at = [], 2
        for shape in ((k, k), (k,), (k, k), (k,), (m, k), (m,)):
            size = int(np.prod(shape))
            arrays.append(v[at : at + size].reshape(shape).copy())
            at += size
        D, d, Dp, dp, X, y = arrays
        return cls(D=D, d=d, n=n, X=X, y=y, Dp=Dp, dp=dp)


@dataclass(frozen=True)
class Decision:
    style: Style
    context: str
    propensity: float  # the probability this choice was drawn with
    marginals: dict[str, dict[str, float]]  # per dimension, the probability of each value


@dataclass(frozen=True)
class Population:
    """What the bot knows about people in general: the average taste, and the tastes of
    well-known users (prototypes) that a new user may turn out to be like."""

    mean: np.ndarray  # (F,) a ridge fit of everyone's data
    prototypes: np.ndarray  # (M, F) centres of groups of users with similar tastes
    owners: tuple[int, ...] = ()  # a prototype made of one user's taste: that user (else -1)
    sizes: tuple[int, ...] = ()  # users in each group: the prototypes' prior weights

    @classmethod
    def empty(cls) -> Population:
        return cls(np.zeros(N_FEATURES), np.zeros((0, N_FEATURES)))

    def to_bytes(self) -> bytes:
        m = len(self.prototypes)
        parts = [[m], self.mean, self.prototypes.ravel(), self.owners or [-1] * m, self.sizes or [1] * m]
        return np.concatenate([np.asarray(p, dtype="<f8") for p in parts]).tobytes()

    @classmethod
    def from_bytes(cls, blob: bytes) -> Population:
        values = np.frombuffer(blob, dtype="<f8")
        m, f = int(values[0]), N_FEATURES
        rest = values[1 + f + m * f :]
        return cls(values[1 : 1 + f].copy(), values[1 + f : 1 + f + m * f].reshape(m, f).copy(),
                   tuple(int(o) for o in rest[:m]), tuple(int(n) for n in rest[m:]))  # fmt: skip


@dataclass(frozen=True)
class ChoiceTable:
    """The probability of choosing each allowed style, for one posterior and context."""

    allowed: np.ndarray  # indices into ALL_STYLES
    probs: np.ndarray
    cumulative: np.ndarray
    marginals: dict[str, dict[str, float]]


@dataclass(frozen=True)
class Posterior:
    """A mixture of Gaussians over a user's ``w``: one component per prior component."""

    means: np.ndarray  # (K, F)
    covs: np.ndarray  # (K, F, F)
    weights: np.ndarray  # (K,) posterior probability of each component
    evidence: float = 0.0  # the user's reactions behind it (undiscounted count)
    tables: dict[tuple[str, tuple[tuple[str, str], ...], bytes], ChoiceTable] = field(
        default_factory=dict, compare=False
    )

    def mean(self) -> np.ndarray:
        return self.weights @ self.means

    @functools.cached_property
    def explore_chol(self) -> np.ndarray:
        """Cholesky factor of the broad component's covariance, for Thompson draws."""
        return np.linalg.cholesky(self.covs[0] + 1e-12 * np.eye(self.covs.shape[1]))


class StyleBandit:
    def __init__(self, config: BanditConfig | None = None) -> None:
        self.config = config or BanditConfig()
        c = self.config
        self.P_broad = c.precision(c.prior_sd_intercept, c.prior_sd_main, c.prior_sd_context)
        self.P_near = c.precision(c.near_sd_intercept, c.near_sd_main, c.near_sd_context)

    # --- what the population likes -----------------------------------------------------------

    def population(self, users: dict[int, UserStats], prior_mean: np.ndarray | None = None) -> Population:
        """Refit the population from every user's statistics: the average taste, and
        prototypes, the tastes of groups of similar users, fitted as a mixture of linear
        regressions over all their reactions (EM). Pooling a group's reactions pins down
        each dimension even when each member saw only a few styles."""
        c = self.config
        m0 = np.zeros(N_FEATURES) if prior_mean is None else prior_mean
        mean = self.average_taste(list(users.values()), m0)
        known = sorted((s.n, u) for u, s in users.items() if s.n >= c.prototype_min_obs)[-c.max_prototypes :]
        if len(known) < max(4, c.prototype_min_users):
            return Population(mean, np.zeros((0, N_FEATURES)))
        group = [users[u] for _, u in known]
        prototypes, weights = mixture_of_regressions(
            np.array([s.Dp for s in group]), np.array([s.dp for s in group]), mean, self.P_broad,
            min(c.clusters, len(group) // 4), sharpness=c.em_sharpness,
        )  # fmt: skip
        sizes = tuple(max(1, round(w * len(group))) for w in weights)
        return Population(mean, prototypes, tuple(-1 for _ in sizes), sizes)

    def average_taste(self, users: list[UserStats], prior_mean: np.ndarray) -> np.ndarray:
        """The average of users' own tastes, with each user's ``w`` drawn around it under the
        broad prior (a random-effects fit: generalised least squares over all reactions).

        Not a regression that pools everyone's reactions as if from one person: the bot
        shows each user what it thinks they like, so pooled, a style looks as good as the
        tastes of the people it is shown to, and differences between styles shrink toward
        nothing the better the bot personalises. Fitting each user's deviation from the
        average takes most of that bias away. A user's weight grows with their reactions and stops
        growing once their own taste is known (``P (P + D)⁻¹ D``, at most ``P``); with few
        reactions each, this is the pooled fit. ``population_ridge`` shrinks it toward
        ``prior_mean`` when data is scarce."""
        c = self.config
        A = c.population_ridge * np.eye(N_FEATURES)
        b = c.population_ridge * prior_mean
        if users:
            Ds = np.array([s.Dp for s in users])
            rhs = np.concatenate([Ds, np.array([s.dp for s in users])[:, :, None]], axis=2)
            solved = np.linalg.solve(self.P_broad[None] + Ds, rhs).sum(axis=0)  # Σ (P + D)⁻¹ [D | d]
            A = A + self.P_broad @ solved[:, :N_FEATURES]
            b = b + self.P_broad @ solved[:, N_FEATURES]
        return np.linalg.solve(A, b)

    @staticmethod
    def _single(stats: UserStats, m: np.ndarray, P0: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        cov = np.linalg.inv(P0 + stats.D)
        return cov @ (P0 @ m + stats.d), (cov + cov.T) / 2

    # --- what this user likes -------------------------------------------------------------

    def posterior(self, stats: UserStats, population: Population, user: int | None = None) -> Posterior:
        """The user's posterior under the mixture prior: the broad component around the
        population mean, plus one narrow component around each other user's taste."""
        c = self.config
        keep = [i for i, owner in enumerate(population.owners) if owner != user or user is None]
        prototypes = population.prototypes[keep]
        sizes = np.array([population.sizes[i] if population.sizes else 1 for i in keep], dtype=float)
        broad_mean, broad_cov = self._single(stats, population.mean, self.P_broad)
        if not len(prototypes):
            return Posterior(broad_mean[None], broad_cov[None], np.ones(1), evidence=stats.n)
        P = self.P_near + stats.D
        near_cov = np.linalg.inv(P)
        near_cov = (near_cov + near_cov.T) / 2
        H = prototypes @ self.P_near + stats.d  # (M, F): P0 m + d for each prototype m
        near_means = H @ near_cov
        # log evidence of the user's data under each component (terms shared by all dropped)
        near_ev = 0.5 * np.einsum("mf,mf->m", H, near_means) - 0.5 * np.einsum(
            "mf,fg,mg->m", prototypes, self.P_near, prototypes
        )
        near_ev += 0.5 * (np.linalg.slogdet(self.P_near)[1] - np.linalg.slogdet(P)[1])
        hb = self.P_broad @ population.mean + stats.d
        broad_ev = 0.5 * hb @ broad_mean - 0.5 * population.mean @ self.P_broad @ population.mean
        broad_ev += 0.5 * (np.linalg.slogdet(self.P_broad)[1] - np.linalg.slogdet(self.P_broad + stats.D)[1])
        # Broad against the groups as a whole: the Gaussian evidence. Among the groups: the
        # reactions' own (Bernoulli) likelihood under each group's taste, which tells
        # groups apart sooner than the Gaussian approximation does.
        log_prior = np.log(sizes / sizes.sum())
        log_groups = _logsumexp(log_prior + near_ev)
        log_w_broad = math.log(c.broad_weight) + broad_ev
        log_w_near = math.log(1 - c.broad_weight) + log_groups
        within = log_prior + self._bernoulli_evidence(stats, prototypes)
        log_w = np.concatenate([[log_w_broad], log_w_near + within - _logsumexp(within)])
        weights = np.exp(log_w - log_w.max())
        means = np.vstack([broad_mean[None], near_means])
        covs = np.concatenate([broad_cov[None], np.broadcast_to(near_cov, (len(prototypes), *near_cov.shape))])
        return Posterior(means, covs, weights / weights.sum(), evidence=stats.n)

    def _bernoulli_evidence(self, stats: UserStats, prototypes: np.ndarray) -> np.ndarray:
        """Discounted log likelihood of the user's recent rewards under each prototype,
        reading a reward ``y`` in [-1, 1] as a like with probability ``(1 + y) / 2``."""
        if not len(stats.y):
            return np.zeros(len(prototypes))
        p = np.clip((1 + stats.X @ prototypes.T) / 2, 0.02, 0.98)  # (T, M)
        liked = ((1 + stats.y) / 2)[:, None]
        ages = np.arange(len(stats.y))[::-1]
        decay = (self.config.evidence_gamma**ages)[:, None]
        return np.sum(decay * (liked * np.log(p) + (1 - liked) * np.log(1 - p)), axis=0)

    def choose(
        self,
        posterior: Posterior,
        context: str,
        fixed: dict[str, str],
        rng: np.random.Generator,
        realisation: Realisation = PERFECT,
    ) -> Decision:
        """The style to request for one reply, among those that agree with ``fixed``: one
        draw from :meth:`choice_probabilities`, whose probability is logged as the propensity."""
        table = self.choice_probabilities(posterior, context, fixed, realisation)
        i = min(int(np.searchsorted(table.cumulative, rng.random() * table.cumulative[-1], side="right")),
                len(table.allowed) - 1)  # fmt: skip
        return Decision(ALL_STYLES[int(table.allowed[i])], context, float(table.probs[i]), table.marginals)

    def choice_probabilities(
        self, posterior: Posterior, context: str, fixed: dict[str, str], realisation: Realisation = PERFECT
    ) -> ChoiceTable:
        """How likely each allowed style is to be requested under this posterior, each
        judged by the reply it will give (``realisation``: how often a request shows).

        With the probability that the user is like nobody known (the broad component), a
        Thompson draw from it, tempered by ``explore_scale``: exploration that also teaches
        the population something new. Otherwise the best style under the prototypes'
        posterior mean: once a user resembles known groups, reactions tell the groups apart
        whatever is shown, so exploring further costs likes for little. The Thompson part
        is estimated from ``samples`` draws (with a fixed seed: the same posterior gives
        the same table) and kept with the posterior, so a choice costs one random number
        until the user's next reaction, and the logged propensity is the exact probability
        the choice was drawn with."""
        key = (context, tuple(sorted(fixed.items())), realisation.key)
        if (cached := posterior.tables.get(key)) is not None:
            return cached
        allowed = _allowed(fixed)
        if realisation is PERFECT:
            X = _FEATURES[context if context in _FEATURES else "chat"][allowed]
        else:
            X = realisation.expected_features(context)[allowed]
        explore = float(posterior.weights[0]) if len(posterior.weights) > 1 else 1.0
        # Exploring pays back only through the user's own reactions: until they have given
        # some, take what is best for people like them (the population's best, at first).
        explore *= posterior.evidence / (posterior.evidence + self.config.explore_after)
        probs = np.zeros(len(allowed))
        if explore > 0:
            rng = np.random.default_rng([TABLE_SEED, zlib.crc32(posterior.means[0].tobytes())])
            chol = posterior.explore_chol * math.sqrt(self.config.explore_scale)
            draws = posterior.means[0] + rng.standard_normal((self.config.samples, N_FEATURES)) @ chol.T
            probs += explore * np.bincount(np.argmax(draws @ X.T, axis=1), minlength=len(allowed)) / len(draws)
        if explore < 1:
            if len(posterior.weights) > 1:
                near = posterior.weights[1:] / posterior.weights[1:].sum()
                best = (near @ posterior.means[1:]) @ X.T
            else:
                best = posterior.means[0] @ X.T
            probs[int(np.argmax(best))] += 1 - explore
        firsts = probs @ (_STYLE_SIGNS[allowed] > 0)  # per dimension, the probability of its first value
        marginals = {dim: {DIMENSIONS[dim][0]: round(float(f), 4), DIMENSIONS[dim][1]: round(1 - float(f), 4)}
                     for dim, f in zip(DIMS, firsts, strict=True)}  # fmt: skip
        table = ChoiceTable(allowed, probs, np.cumsum(probs), marginals)
        posterior.tables[key] = table
        return table

    def beliefs(self, posterior: Posterior) -> dict[str, tuple[str, float]]:
        """Per dimension, the value this user more likely prefers and how likely (context
        averaged): ``{"length": ("brief", 0.93), ...}``."""
        out = {}
        contexts = 1 + len(DIMS) * np.arange(1, len(CONTEXTS) + 1)
        for j, dim in enumerate(DIMS):
            # The main effect plus the average of the context effects, as one linear form.
            a = np.zeros(N_FEATURES)
            a[1 + j] = 1.0
            a[contexts + j] = 1.0 / len(CONTEXTS)
            means = posterior.means @ a
            sds = np.sqrt(np.einsum("f,kfg,g->k", a, posterior.covs, a))
            first_better = float(posterior.weights @ [0.5 * (1 + math.erf(m / (s * math.sqrt(2)))) for m, s in
                                                      zip(means, sds, strict=True)])  # fmt: skip
            if first_better >= 0.5:
                out[dim] = (DIMENSIONS[dim][0], first_better)
            else:
                out[dim] = (DIMENSIONS[dim][1], 1 - first_better)
        return out


def _logsumexp(values: np.ndarray) -> float:
    top = float(np.max(values))
    return top + math.log(float(np.sum(np.exp(values - top))))


def mixture_of_regressions(
    Ds: np.ndarray,
    ds: np.ndarray,
    prior_mean: np.ndarray,
    prior_precision: np.ndarray,
    k: int,
    iterations: int = 30,
    sharpness: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """EM for ``k`` groups over users' sufficient statistics ``(D_u, d_u)``: each group has
    one ``w``; a user's log likelihood under ``w`` is ``w·d_u - wᵀD_u w / 2`` (plus a
    constant of their own). Deterministic: started from users spread by k-means++."""
    n = len(Ds)
    own = np.array(
        [np.linalg.solve(prior_precision + D, prior_precision @ prior_mean + d) for D, d in zip(Ds, ds, strict=True)]
    )
    rng = np.random.default_rng(0)
    starts = [int(rng.integers(n))]
    while len(starts) < k:
        dist = np.min([np.sum((own - own[i]) ** 2, axis=1) for i in starts], axis=0)
        if dist.sum() == 0:
            break
        starts.append(int(rng.choice(n, p=dist / dist.sum())))
    w = own[starts].copy()
    pi = np.full(len(w), 1.0 / len(w))
    for _ in range(iterations):
        ll = (ds @ w.T - 0.5 * np.einsum("kf,ufg,kg->uk", w, Ds, w)) * sharpness
        log_r = np.log(pi) + ll
        r = np.exp(log_r - log_r.max(axis=1, keepdims=True))
        r /= r.sum(axis=1, keepdims=True)
        pi = np.maximum(r.mean(axis=0), 1e-6)
        for j in range(len(w)):
            A = prior_precision + np.einsum("u,ufg->fg", r[:, j], Ds)
            w[j] = np.linalg.solve(A, prior_precision @ prior_mean + r[:, j] @ ds)
    keep = pi > 0.5 / n  # a group with less than half a user goes
    return w[keep], pi[keep] / pi[keep].sum()
