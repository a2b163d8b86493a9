"""Typed settings: the one place that says what attune can be configured with.

Sources, later ones winning:

1. the defaults written in the models below (the same values ``config.toml`` lists);
2. a TOML file: ``--config PATH``, else ``$ATTUNE_CONFIG``, else ``./config.toml``;
3. environment variables ``ATTUNE_<SECTION>__<KEY>`` (``__`` separates nesting levels,
   e.g. ``ATTUNE_LLM__OPENAI__BASE_URL``).

Secrets (API keys, tokens) never come from the file: they are read from their own
environment variables into :class:`Secrets`, and a secret found in the file is an error.

Any problem — a wrong type, a bad value, an unknown key, a secret in the file — raises
:class:`ConfigError` with one message naming each key and where it came from.
"""

from __future__ import annotations

import functools
import os
import re
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import tomli_w
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    TypeAdapter,
    ValidationError,
    create_model,
    field_validator,
)

from agent_core.platforms import PlatformSpec
from agent_core.style import Emoji, Format, Length, Tone

ENV_PREFIX = "ATTUNE_"
CONFIG_ENV = "ATTUNE_CONFIG"
DEFAULT_CONFIG_FILE = "config.toml"


class ConfigError(Exception):
    """Bad configuration: the message names the key and the file (or variable)."""


class Section(BaseModel):
    # Strict: a TOML string where a number belongs is an error, not a silent coercion.
    # A field's docstring is its description: config.toml's comment for a platform's section (document_section).
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True, use_attribute_docstrings=True)


class StorageSettings(Section):
    data_dir: str = "./data"
    database: str = "attune.db"
    url: str = ""  # "postgresql://user@host:port/db" for PostgreSQL; empty: the SQLite file above
    busy_timeout_ms: int = Field(default=5000, ge=0)
    synchronous: Literal["normal", "full"] = "normal"
    retention_days: int = Field(default=0, ge=0)  # delete messages older than this, daily; 0 = keep them
    min_free_mb: int = Field(default=200, ge=0)  # `attune run` warns (at start, hourly) below this much free disk

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir).expanduser().resolve()

    @field_validator("url")
    @classmethod
    def _postgres_url(cls, value: str) -> str:
        if value and not value.startswith(("postgresql://", "postgres://")):
            raise ValueError('must be empty (SQLite) or a PostgreSQL URL, "postgresql://user@host:port/database"')
        if value and urlsplit(value).password is not None:
            raise ValueError("holds a password: leave it out of the URL and set PGPASSWORD (or use ~/.pgpass)")
        return value

    @property
    def adapters_path(self) -> Path:
        """Where trained adapters live: ``<data_dir>/adapters/<user id | population>/<version>``."""
        return self.data_path / "adapters"

    @property
    def database_path(self) -> Path:
        return self.data_path / self.database

    @property
    def sqlalchemy_url(self) -> str:
        """The same database for SQLAlchemy (APScheduler's job store)."""
        if self.url:
            return "postgresql+psycopg://" + self.url.split("://", 1)[1]
        return f"sqlite:///{self.database_path}"


class LocalLLMSettings(Section):
    model: str = "smollm2"
    cache_dir: str = ""
    threads: int = Field(default=0, ge=0)
    context_window: int = Field(default=0, ge=0)
    repetition_penalty: float = Field(default=1.1, ge=1.0, le=2.0)
    no_repeat_ngram: int = Field(default=4, ge=0, le=16)  # the loop guard: no repeated n-gram of this size; 0 = off
    style_control: bool = True  # steer decoding so the chosen style shows (agent_core/llm/style_control.py)
    max_loaded_adapters: int = Field(default=16, ge=1)
    # Serving many users at once (continuous batching; Llama-family models):
    batching: bool = True  # false: plain transformers generate, one request at a time
    max_batch_size: int = Field(default=8, ge=1, le=64)  # replies generated together
    max_queue: int = Field(default=32, ge=0)  # requests waiting for a slot; past it: "busy"
    queue_timeout_s: float = Field(default=60.0, gt=0.0)  # longest wait for a slot; then "busy"
    batch_wait_ms: float = Field(default=10.0, ge=0.0, le=1000.0)  # idle: wait this long for a burst
    prefill_chunk: int = Field(default=256, ge=16, le=8192)  # prompt tokens read in between two decode steps
    kernel: Literal["auto", "gemv", "onednn", "linear"] = "auto"  # the decoder's matmuls (agent_core/llm/kernels.py)
    weights: Literal["fp32", "int8", "int4"] = "int4"  # weight-only quantization (agent_core/llm/quantized.py)


class OpenAISettings(Section):
    base_url: str = "https://api.openai.com/v1"
    model: str = "gpt-4o-mini"
    context_window: int = Field(default=8192, ge=256)
    max_retries: int = Field(default=1, ge=0)
    # vLLM: register each user's promoted adapter at run time (POST /v1/load_lora_adapter)
    load_adapters: bool = False
    adapter_dir: str = ""  # the adapters directory as the server sees it; "" = the same path as here


class LLMSettings(Section):
    backend: Literal["local", "openai"] = "local"
    max_new_tokens: int = Field(default=160, ge=1, le=4096)
    temperature: float = Field(default=0.3, ge=0.0, le=2.0)
    top_p: float = Field(default=0.9, gt=0.0, le=1.0)
    timeout_s: float = Field(default=120.0, gt=0.0)
    local: LocalLLMSettings = LocalLLMSettings()
    openai: OpenAISettings = OpenAISettings()


class AgentSettings(Section):
    name: str = "attune"
    system_prompt: str = "You are attune, a friendly and helpful assistant."
    recent_turns: int = Field(default=12, ge=0)
    memory_notes: int = Field(default=5, ge=0)  # at most this many notes recalled into a prompt
    # ...each at least this relevant (agent_core/memory/recall.py: meaning, twice, plus a bonus for a shared word)
    memory_threshold: float = Field(default=0.6, ge=0.0, le=2.5)


class MemorySettings(Section):
    """Long-term notes kept without being asked, recalled when they matter (agent_core/memory/)."""

    automatic: bool = True  # keep what people say about themselves in ordinary messages
    extract: Literal["rules", "model"] = "rules"  # "model": ask the configured LLM which facts a message states
    recall_in_groups: bool = False  # recall a person's notes in group chats too (else only in their private chats)
    embeddings: bool = True  # recall by meaning (all-MiniLM-L6-v2, loaded in the background); false: keywords only


class StyleDefaults(Section):
    """The style used for a dimension the user has not set and nothing has learned."""

    length: Length = "brief"
    tone: Tone = "casual"
    emoji: Emoji = "none"
    format: Format = "prose"


class PolicySettings(Section):
    learn: bool = True
    seed: int = 0
    discount: float = Field(default=0.96, gt=0.5, le=1.0)
    refit_every: int = Field(default=20, ge=1)


class SteeringSettings(Section):
    """Each user's reward model steers their replies with lookahead, from their next reaction on
    (agent_core/steering.py, agent_core/llm/lookahead.py; the local backend only). Off by
    default: bench.adapters measured no gain in like rate from it yet (README, "Steering")."""

    enabled: bool = False
    # "auto": chosen per user by the nightly job's measurement (the best reward within the
    # fluency guard); a number fixes it: 0 is no steering, "inf" keeps the best candidate
    strength: float | Literal["auto"] = "auto"
    candidates: int = Field(default=4, ge=1, le=16)  # candidate sentences decoded side by side for each sentence
    top_k: int = Field(default=50, ge=1, le=1000)  # a candidate samples among this many most likely next tokens
    temperature: float = Field(default=0.8, gt=0.0, le=2.0)  # candidates sample at least this hot, so they differ
    refit_every: int = Field(default=20, ge=1)  # refit everyone's reward model (each user's prior) after this many

    @field_validator("strength")
    @classmethod
    def _strength(cls, value: float | str) -> float | str:
        if isinstance(value, float) and value < 0:
            raise ValueError('must be "auto" or a number of 0 or more')
        return value


class TrainingSettings(Section):
    """The nightly per-user LoRA job (agent_core/training, scheduler/)."""

    enabled: bool = True
    cron: str = "0 3 * * *"
    timezone: str = ""
    min_new_rated: int = Field(default=20, ge=1)
    min_population_liked: int = Field(default=20, ge=1)
    holdout_fraction: float = Field(default=0.2, gt=0.0, lt=1.0)
    # sft: liked replies; kto: liked and disliked; raft: SFT on the best of `samples` sampled
    # replies by the user's reward model (and the liked ones); dpo: best against worst of them;
    # distill: the replies the user's reward model steers, token by token and sentence against sentence
    objective: Literal["sft", "kto", "raft", "dpo", "distill"] = "sft"
    amplify: float = Field(default=1.0, ge=1.0, le=4.0)  # distill: scale what the adapter learned (ExPO)
    samples: int = Field(default=4, ge=2, le=16)  # raft/dpo: candidates sampled per prompt
    sample_prompts: int = Field(default=16, ge=1)  # raft/dpo: the user's newest prompts sampled for
    min_spread: float = Field(default=0.05, ge=0.0, lt=1.0)  # raft/dpo: skip prompts whose candidates score closer
    max_kl: float = Field(default=0.5, gt=0.0)  # raft/dpo gate: the candidate's KL to the base, nats per token
    rank: int = Field(default=8, ge=1, le=256)
    alpha: int = Field(default=16, ge=1)
    dropout: float = Field(default=0.05, ge=0.0, lt=1.0)
    targets: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"], min_length=1)
    layers: int = Field(default=0, ge=0)  # LoRA on the top this many layers only (0 = every layer)
    learning_rate: float = Field(default=1e-3, gt=0.0, le=1.0)
    epochs: int = Field(default=3, ge=1)
    batch_size: int = Field(default=8, ge=2)
    max_length: int = Field(default=512, ge=32)
    threads: int = Field(default=1, ge=1)
    executor: Literal["local", "ray"] = "local"
    workers: int = Field(default=1, ge=1)
    ray_address: str = ""
    margin: float = Field(default=0.02, ge=0.0, lt=1.0)
    redact_patterns: list[str] = Field(default_factory=list)
    lock_ttl_s: float = Field(default=600.0, ge=30.0)

    @field_validator("cron")
    @classmethod
    def _cron(cls, value: str) -> str:
        from apscheduler.triggers.cron import CronTrigger

        try:
            CronTrigger.from_crontab(value)
        except ValueError as exc:
            raise ValueError(f"not a crontab schedule (minute hour day month weekday): {exc}") from exc
        return value

    @field_validator("timezone")
    @classmethod
    def _timezone(cls, value: str) -> str:
        if value:
            try:
                ZoneInfo(value)
            except (ZoneInfoNotFoundError, ValueError) as exc:
                raise ValueError(f"unknown time zone {value!r} (use an IANA name like Europe/Berlin)") from exc
        return value

    @field_validator("redact_patterns")
    @classmethod
    def _patterns(cls, value: list[str]) -> list[str]:
        for pattern in value:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"{pattern!r} is not a regular expression: {exc}") from exc
        return value


class LimitsSettings(Section):
    messages_per_minute: int = Field(default=20, ge=1)
    global_messages_per_minute: int = Field(default=600, ge=0)  # 0: no limit for the bot as a whole
    max_message_chars: int = Field(default=4000, ge=1)


class AccessSettings(Section):
    allowed_users: list[str] = Field(default_factory=list)  # "platform:id"; a platform listed answers only these
    allowed_chats: list[str] = Field(default_factory=list)  # "platform:chat id"; likewise for chats
    admins: list[str] = Field(default_factory=list)  # "platform:id": may use /admin

    @field_validator("allowed_users", "allowed_chats", "admins")
    @classmethod
    def _platform_ids(cls, entries: list[str]) -> list[str]:
        for entry in entries:
            platform, _, ident = entry.partition(":")
            if not platform or not ident or platform != platform.strip().lower() or ident != ident.strip():
                raise ValueError(f'{entry!r} is not "platform:id" (a platform, a colon, its id of the user or chat)')
        return entries


class LoggingSettings(Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"


class RunSettings(Section):
    default_front_end: bool = True
    retry_initial_s: float = Field(default=5.0, gt=0)
    retry_max_s: float = Field(default=300.0, gt=0)
    answer_missed_within_s: float = Field(default=3600.0, ge=0)


DEFAULT_REWARDS: dict[str, float] = {
    "👍": 1.0,
    "👎": -1.0,
    "❤️": 1.0,
    "😂": 0.5,
    "🎉": 0.8,
    "😕": -0.5,
    "🙏": 0.7,
    "🔥": 0.8,
    "👀": 0.0,
    "+1": 1.0,
    "thumbsup": 1.0,
    "-1": -1.0,
    "thumbsdown": -1.0,
    "heart": 1.0,
    "joy": 0.5,
    "tada": 0.8,
    "confused": -0.5,
    "pray": 0.7,
    "fire": 0.8,
    "eyes": 0.0,
}


Reward = Annotated[float, Field(ge=-1.0, le=1.0)]


class Settings(Section):
    storage: StorageSettings = StorageSettings()
    llm: LLMSettings = LLMSettings()
    agent: AgentSettings = AgentSettings()
    memory: MemorySettings = MemorySettings()
    style: StyleDefaults = StyleDefaults()
    policy: PolicySettings = PolicySettings()
    steering: SteeringSettings = SteeringSettings()
    training: TrainingSettings = TrainingSettings()
    limits: LimitsSettings = LimitsSettings()
    access: AccessSettings = AccessSettings()
    rewards: dict[str, Reward] = Field(default_factory=lambda: dict(DEFAULT_REWARDS))
    logging: LoggingSettings = LoggingSettings()
    run: RunSettings = RunSettings()
    # Each platform's own section ([<platform>]) is added by settings_model().


@functools.cache
def settings_model(platforms: tuple[PlatformSpec, ...]) -> type[Settings]:
    """:class:`Settings` with a ``[<name>]`` section for each platform (its own model)."""
    sections: dict[str, Any] = {p.name: (p.settings, p.settings()) for p in platforms if p.settings is not None}
    if not sections:
        return Settings
    clash = set(sections) & set(Settings.model_fields)
    if clash:
        raise ValueError(f"platform names {sorted(clash)} are core settings sections")
    return create_model("Settings", __base__=Settings, **sections)


class Secrets(BaseModel):
    """Values read only from the environment; never written to logs or output. The
    core's own are below; each platform's come from its :class:`~agent_core.platforms.Secret`."""

    model_config = ConfigDict(frozen=True)
    openai_api_key: SecretStr | None = None
    encryption_key: SecretStr | None = None
    new_encryption_key: SecretStr | None = None
    database_password: SecretStr | None = None  # read by libpq itself; known here to keep it out of logs
    platform: dict[str, SecretStr] = Field(default_factory=dict)  # a platform's secret name -> its value
    env: dict[str, str] = Field(default_factory=lambda: dict(SECRET_ENV))  # every secret name -> its variable

    @classmethod
    def from_env(cls, environ: Mapping[str, str], platforms: tuple[PlatformSpec, ...] = ()) -> Secrets:
        declared = {s.name: s.env for p in platforms for s in p.secrets}
        core = {name: environ[var] for name, var in SECRET_ENV.items() if environ.get(var)}
        theirs = {name: SecretStr(environ[var]) for name, var in declared.items() if environ.get(var)}
        return cls(**core, platform=theirs, env={**SECRET_ENV, **declared})

    def values(self) -> list[str]:
        """Every secret that is set, for log redaction."""
        return [value for name in self.env if (value := self.get(name))]

    def get(self, name: str) -> str | None:
        """The plain value of one secret, or None when its variable is not set; a name that
        neither the core nor a registered platform declares is a KeyError (a typo, not "unset")."""
        value: SecretStr | None
        if name in self.platform:
            value = self.platform[name]
        elif name in SECRET_ENV:
            value = getattr(self, name)
        elif name in self.env:
            value = None  # a platform's secret whose variable is not set
        else:
            raise KeyError(f"no secret named {name!r}; declared: {', '.join(sorted(self.env))}")
        return value.get_secret_value() if value else None


# The core's secret names -> their environment variables (the platforms declare their own).
SECRET_ENV: dict[str, str] = {
    "openai_api_key": "OPENAI_API_KEY",
    "encryption_key": "ATTUNE_ENCRYPTION_KEY",
    "new_encryption_key": "ATTUNE_NEW_ENCRYPTION_KEY",  # for `attune keys rotate`
    "database_password": "PGPASSWORD",  # [storage] url = "postgresql://..."
}
# Where someone might wrongly put one of the core's secrets in the file -> the variable to use instead.
SECRET_FILE_KEYS: dict[str, str] = {
    "llm.openai.api_key": "OPENAI_API_KEY",
    "storage.encryption_key": "ATTUNE_ENCRYPTION_KEY",
}


class Config(BaseModel):
    """Everything attune runs with: the settings, the secrets, and where they came from."""

    model_config = ConfigDict(frozen=True)
    settings: Settings
    secrets: Secrets
    source: Path | None  # the TOML file read, or None when running on defaults


def _describe(error: Mapping[str, Any]) -> str:
    if error["type"] == "extra_forbidden":
        return "unknown key"
    msg = error["msg"]
    got = error["input"]
    if isinstance(got, str) and "://" in got:  # a URL may carry a password: never echoed
        got = re.sub(r"(://[^/@]*?):[^/@]*@", r"\1:***@", got)
    return f"{msg[0].lower()}{msg[1:]} (got {got!r})"


def _field_type(model: Any, path: tuple[str, ...]) -> Any:
    """The annotation of the setting at ``path`` in ``model``, or None for an unknown key."""
    for i, part in enumerate(path):
        if isinstance(model, type) and issubclass(model, BaseModel):
            field = model.model_fields.get(part)
            if field is None:
                return None
            model = field.annotation
        elif getattr(model, "__origin__", None) is dict and i == len(path) - 1:
            return model.__args__[1]
        else:
            return None
    return model


def _env_overrides(
    environ: Mapping[str, str], model: type[Settings]
) -> tuple[dict[str, Any], dict[tuple[str, ...], str]]:
    """Parse ``ATTUNE_<SECTION>__<KEY>`` variables into a nested dict of typed values."""
    data: dict[str, Any] = {}
    origin: dict[tuple[str, ...], str] = {}
    problems: list[str] = []
    for var, raw in sorted(environ.items()):
        if not var.startswith(ENV_PREFIX) or "__" not in var:
            continue  # ATTUNE_CONFIG, ATTUNE_ADMIN_TOKEN...: not settings overrides
        path = tuple(p.lower() for p in var[len(ENV_PREFIX) :].split("__"))
        annotation = _field_type(model, path)
        if annotation is None or (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            problems.append(f"{'.'.join(path)}: unknown key (from environment variable {var})")
            continue
        try:
            value = TypeAdapter(annotation).validate_python(raw, strict=False)
        except ValidationError as exc:
            problems.append(f"{'.'.join(path)}: {_describe(exc.errors()[0])} (from environment variable {var})")
            continue
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
        origin[path] = var
    if problems:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems))
    return data, origin


def _merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``over`` laid on top, table by table."""
    out = dict(base)
    for key, value in over.items():
        both_tables = isinstance(value, Mapping) and isinstance(out.get(key), Mapping)
        out[key] = _merge(out[key], value) if both_tables else value
    return out


def resolve_config_path(cli_path: str | None, environ: Mapping[str, str]) -> Path | None:
    """The file to read: the CLI flag, then $ATTUNE_CONFIG, then ./config.toml if present."""
    if cli_path:
        return Path(cli_path)
    if environ.get(CONFIG_ENV):
        return Path(environ[CONFIG_ENV])
    default = Path(DEFAULT_CONFIG_FILE)
    return default if default.exists() else None


def load_config(
    path: str | Path | None = None,
    environ: Mapping[str, str] | None = None,
    platforms: Sequence[PlatformSpec] = (),
) -> Config:
    """Read settings from ``path`` (see :func:`resolve_config_path`) and the environment,
    with a section and the secrets of each of ``platforms`` (``attune.wiring`` gives them all)."""
    environ = os.environ if environ is None else environ
    specs = tuple(platforms)
    model = settings_model(specs)
    file_keys = {**SECRET_FILE_KEYS, **{s.file_key: s.env for p in specs for s in p.secrets}}
    source = resolve_config_path(str(path) if path else None, environ)
    file_data: dict[str, Any] = {}
    if source is not None:
        try:
            file_data = tomllib.loads(source.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{source}: config file not found") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{source}: not valid TOML: {exc}") from None
        for key, var in file_keys.items():
            node: Any = file_data
            for part in key.split("."):
                node = node.get(part) if isinstance(node, dict) else None
            if node is not None:
                raise ConfigError(
                    f"{source}: {key}: secrets are read only from the environment; "
                    f"remove it from the file and set {var} instead"
                )
    env_data, env_origin = _env_overrides(environ, model)
    data = _merge(_merge(model().model_dump(), file_data), env_data)
    try:
        settings = model.model_validate(data)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = tuple(str(p) for p in err["loc"])
            where = f"environment variable {env_origin[loc]}" if loc in env_origin else str(source or "defaults")
            lines.append(f"{'.'.join(loc)}: {_describe(err)} (in {where})")
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(lines)) from None
    return Config(settings=settings, secrets=Secrets.from_env(environ, specs), source=source)


def effective_settings(config: Config) -> dict[str, Any]:
    """Settings plus masked secrets, as plain data for ``attune config show``."""
    data = config.settings.model_dump(mode="json")
    data["secrets"] = {
        var: ("******** (set)" if config.secrets.get(name) else "(not set)") for name, var in config.secrets.env.items()
    }
    return data


COMMENT_COLUMN = 32  # where config.toml's comments start


def _commented(text: str, comment: str | None) -> str:
    if not comment:
        return text
    return f"{text:<{COMMENT_COLUMN - 1}} # {comment}" if len(text) < COMMENT_COLUMN - 1 else f"{text}  # {comment}"


def document_section(name: str, model: type[BaseModel]) -> str:
    """The ``[name]`` section as config.toml lists it, from the model alone: each key with
    its default, commented with the field's docstring; the class docstring on the header.
    This is how a platform documents its section: in its own module."""
    lines = [_commented(f"[{name}]", (model.__doc__ or "").strip() or None)]
    for key, value in model().model_dump(mode="json").items():
        lines.append(_commented(tomli_w.dumps({key: value}).strip(), model.model_fields[key].description))
    return "\n".join(lines) + "\n"
