"""Federated algorithms as registered units: a name, its hyper-parameters, its server rule, its client hook.

One :class:`Algorithm` says everything the rest of UnitedLLM needs to know about a federated
algorithm: the name a config gives (case-insensitive), its own hyper-parameter Struct (value
limits as ``Meta``, defaults from its paper), the server rule that aggregates the updates
(:class:`~unitedllm.optimizers.base.ServerOptimizer`) and, when the algorithm changes local
training, its client hook (:class:`~unitedllm.optimizers.client_hook.ClientHook`: FedProx's
proximal term, SCAFFOLD's control variates). The aggregator, the client and the trainers only
talk to these interfaces, so a new algorithm is one file with its rule (and hook) plus its
registration, and nothing else changes.

This module does not import torch: rules and hooks are named ``"module:Class"`` and load on
first use, so checking a config's optimizer name and parameters stays light.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgspec

from unitedllm.errors import ConfigError, ConfigProblem

if TYPE_CHECKING:
    from unitedllm.optimizers.base import ServerOptimizer
    from unitedllm.optimizers.client_hook import ClientHook

__all__ = [
    "PARAMS_PATH",
    "Algorithm",
    "RuleParams",
    "algorithm",
    "available",
    "register_algorithm",
    "schema_choice",
]

#: Where a config keeps the chosen rule's hyper-parameters (FedML's flat section).
PARAMS_PATH = "train_args.server_optimizer_args"


class RuleParams(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Base of every rule's hyper-parameter Struct: keyword-only, unknown keys refused."""


def _load(target: str | type) -> type:
    if isinstance(target, type):
        return target
    module, _, name = target.partition(":")
    loaded: type = getattr(importlib.import_module(module), name)
    return loaded


@dataclass(frozen=True)
class Algorithm:
    """One federated algorithm: what a config names, what it takes, what runs on each side."""

    name: str
    #: Its hyper-parameters (a :class:`RuleParams` subclass; defaults are its paper's).
    params: type[RuleParams]
    #: The server rule: a ServerOptimizer subclass, or ``"module:Class"`` to load on first use.
    server_rule: str | type
    #: What it adds to the clients' local training, or None (plain local training).
    client_hook: str | type | None = None

    def rule_class(self) -> type[ServerOptimizer]:
        """The server rule's class (imports it, and torch, on first use)."""
        return _load(self.server_rule)

    def hook_class(self) -> type[ClientHook] | None:
        """The client hook's class, or None when local training is plain."""
        return None if self.client_hook is None else _load(self.client_hook)

    def parameter_problems(self, given: Any, path: str = PARAMS_PATH) -> Iterator[ConfigProblem]:
        """A problem for each key set in ``given`` (the flat section) that this rule does not take."""
        own = self.params.__struct_fields__
        for key in _set_keys(given):
            if key not in own:
                yield ConfigProblem(
                    f"{path}.{key}",
                    f"{self.name} has no parameter '{key}'; its parameters are {', '.join(own)}",
                )

    def parameters(self, given: Any = None, *, path: str = PARAMS_PATH) -> RuleParams:
        """This rule's parameters from ``given``: its own Struct, FedML's flat section, a mapping or None.

        Keys left unset (or null) take the paper's default; a key of another rule is a ConfigError.
        """
        if isinstance(given, self.params):
            return given
        problems = list(self.parameter_problems(given, path))
        if problems:
            raise ConfigError(problems)
        try:
            return msgspec.convert(_set_keys(given), self.params)
        except msgspec.ValidationError as exc:
            raise ConfigError(ConfigProblem(path, f"{self.name}: {exc}")) from None


def _set_keys(given: Any) -> dict[str, Any]:
    """The keys given a value (not null) in a flat section, a Struct or a mapping."""
    if given is None:
        return {}
    items = given if isinstance(given, Mapping) else msgspec.structs.asdict(given)
    return {k: v for k, v in items.items() if v is not None}


_REGISTRY: dict[str, Algorithm] = {}


def register_algorithm(alg: Algorithm) -> Algorithm:
    """Add ``alg`` under its name (case-insensitive); a name registered twice is a ValueError."""
    key = alg.name.lower()
    if key in _REGISTRY:
        raise ValueError(f"federated algorithm {alg.name!r} is already registered")
    _REGISTRY[key] = alg
    return alg


def available() -> list[str]:
    """Names of every registered algorithm, sorted."""
    return sorted(a.name for a in _REGISTRY.values())


def algorithm(name: str, *, path: str = "train_args.server_optimizer") -> Algorithm:
    """The algorithm called ``name``; an unknown name is a ConfigError listing the choices."""
    try:
        return _REGISTRY[name.lower()]
    except KeyError:
        raise ConfigError(
            ConfigProblem(path, f"unknown server optimizer {name!r}; choose one of {', '.join(available())}")
        ) from None


def _name_pattern(name: str) -> str:
    """A JSON Schema pattern matching ``name`` in any letter case (ECMA regexes have no ``(?i)``)."""
    letters = "".join(f"[{c.upper()}{c.lower()}]" if c.isalpha() else "\\" + c for c in name)
    return f"^{letters}$"


def _inline_schema(params: type[RuleParams]) -> dict[str, Any]:
    generated = msgspec.json.schema(params)
    (only,) = generated["$defs"].values()
    schema: dict[str, Any] = only
    return schema


def schema_choice() -> list[dict[str, Any]]:
    """JSON Schema ``allOf`` entries for ``train_args``: each rule's name selects its own parameters.

    The rule is ``server_optimizer`` when set, else FedML's ``federated_optimizer`` (default FedAvg).
    """
    choice: list[dict[str, Any]] = []
    unset = {
        "anyOf": [
            {"not": {"required": ["server_optimizer"]}},
            {"properties": {"server_optimizer": {"type": "null"}}},
        ]
    }
    for name in available():
        named = {"type": "string", "pattern": _name_pattern(name)}
        by_fedml: dict[str, Any] = {
            "properties": {"federated_optimizer": named},
            "required": ["federated_optimizer"],
        }
        if name == "FedAvg":
            by_fedml = {"anyOf": [by_fedml, {"not": {"required": ["federated_optimizer"]}}]}
        choice.append(
            {
                "if": {
                    "anyOf": [
                        {"properties": {"server_optimizer": named}, "required": ["server_optimizer"]},
                        {"allOf": [unset, by_fedml]},
                    ]
                },
                "then": {
                    "properties": {"server_optimizer_args": _inline_schema(_REGISTRY[name.lower()].params)}
                },
            }
        )
    return choice
