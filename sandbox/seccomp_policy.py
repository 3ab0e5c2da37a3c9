"""Seccomp policy files: parse a readable allow-list, compile it into a libseccomp filter.

The format follows minijail/crosvm `.policy` files, one syscall per line:

    # Comments run from '#' to the end of the line.
    @default kill                      # anything not listed: kill (or log, for development)
    read: 1                            # allowed with any arguments
    mmap: arg2 & PROT_EXEC == 0        # allowed only when the condition holds
    fcntl: arg1 == F_GETFL || arg1 == F_SETFL
    openat: return EPERM               # never runs: fails with this errno instead

A condition is alternatives joined by `||`; an alternative is comparisons joined by `&&`; a
comparison is `argN OP VALUE` (OP one of == != < <= > >=) or the masked `argN & MASK == VALUE`.
A VALUE is a number (decimal or 0x...) or a name from CONSTANTS, several may be joined by `|`.

`parse_policy` is sans-IO (text in, SeccompPolicy out) and reports every mistake as a
SeccompPolicyError naming file:line. Only `read_policy` touches the file system.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import re
import socket
import termios
from dataclasses import dataclass
from pathlib import Path

import pyseccomp

# Names a policy may use for argument values. Taken from the standard library where it has
# them, so they are this platform's values; the rest are Linux UAPI values that never change.
CONSTANTS: dict[str, int] = {
    "PROT_EXEC": mmap.PROT_EXEC,
    "F_GETFL": fcntl.F_GETFL,
    "F_SETFL": fcntl.F_SETFL,
    "F_DUPFD_CLOEXEC": fcntl.F_DUPFD_CLOEXEC,
    "F_GET_SEALS": fcntl.F_GET_SEALS,
    "FIONBIO": termios.FIONBIO,
    "SOL_SOCKET": socket.SOL_SOCKET,
    "SO_PEERCRED": socket.SO_PEERCRED,
    "MREMAP_MAYMOVE": 0x1,  # <linux/mman.h>
    "FALLOC_FL_KEEP_SIZE": 0x01,  # <linux/falloc.h>
    "FALLOC_FL_PUNCH_HOLE": 0x02,
    "FALLOC_FL_ZERO_RANGE": 0x10,
    "TUNSETOFFLOAD": 0x400454D0,  # <linux/if_tun.h>
    "TUNSETQUEUE": 0x400454D9,
}

# What happens to a syscall that no rule allows, by the name `@default` uses.
DEFAULT_ACTIONS = {"kill": pyseccomp.KILL_PROCESS, "log": pyseccomp.LOG}

_OPERATORS = {
    "==": pyseccomp.EQ,
    "!=": pyseccomp.NE,
    "<": pyseccomp.LT,
    "<=": pyseccomp.LE,
    ">": pyseccomp.GT,
    ">=": pyseccomp.GE,
}
_NAME = re.compile(r"[a-z_][a-z0-9_]*")
_RULE = re.compile(r"(?P<name>[^:\s]+)\s*:\s*(?P<body>.*)")
_RETURN = re.compile(r"return\s+(?P<errno>\S+)")
_COMPARISON = re.compile(
    r"arg(?P<arg>\d+)\s*(?:&\s*(?P<mask>[^=!<>]+?)\s*)?(?P<op>==|!=|<=|>=|<|>)\s*(?P<value>.+)"
)
_HEX = re.compile(r"0x[0-9a-fA-F]+")
_MAX_ARG = 5  # syscalls take at most six arguments: arg0 .. arg5
_U64 = 1 << 64


class SeccompPolicyError(ValueError):
    """A policy file is malformed; the message names file:line and what is wrong."""


@dataclass(frozen=True)
class Comparison:
    """`arg OP value`, or `arg & mask == value` when `mask` is set."""

    arg: int
    op: str
    value: int
    mask: int | None = None

    def to_arg(self) -> pyseccomp.Arg:
        if self.mask is not None:
            return pyseccomp.Arg(self.arg, pyseccomp.MASKED_EQ, self.mask, self.value)
        return pyseccomp.Arg(self.arg, _OPERATORS[self.op], self.value)


@dataclass(frozen=True)
class Rule:
    """One policy line. No alternatives and no errno: allowed unconditionally."""

    syscall: str
    number: int
    line: int
    # Allowed when every comparison of any one alternative holds.
    alternatives: tuple[tuple[Comparison, ...], ...] = ()
    # Set for `return ERRNO` rules: the syscall fails with this errno and never runs.
    errno: int | None = None


@dataclass(frozen=True)
class SeccompPolicy:
    source: str
    default: str  # a key of DEFAULT_ACTIONS
    rules: tuple[Rule, ...]

    @property
    def syscalls(self) -> tuple[str, ...]:
        return tuple(rule.syscall for rule in self.rules)


def parse_policy(text: str, source: str = "<policy>") -> SeccompPolicy:
    """Parse policy text; SeccompPolicyError names `source`:line for the first mistake."""
    default: str | None = None
    rules: dict[str, Rule] = {}
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.partition("#")[0].strip()
        if not line:
            continue
        where = f"{source}:{lineno}"
        if line.startswith("@"):
            directive, _, value = line.partition(" ")
            if directive != "@default":
                raise SeccompPolicyError(f"{where}: unknown directive {directive!r}")
            if default is not None:
                raise SeccompPolicyError(f"{where}: @default is given twice")
            value = value.strip()
            if value not in DEFAULT_ACTIONS:
                raise SeccompPolicyError(
                    f"{where}: @default must be one of {', '.join(DEFAULT_ACTIONS)}, not {value!r}"
                )
            default = value
            continue
        rule = _parse_rule(line, lineno, where)
        if rule.syscall in rules:
            first = rules[rule.syscall].line
            raise SeccompPolicyError(
                f"{where}: {rule.syscall} already has a rule on line {first}; "
                "join the conditions with ||"
            )
        rules[rule.syscall] = rule
    if default is None:
        raise SeccompPolicyError(f"{source}: no '@default kill' line says what happens to "
                                 "syscalls the policy does not list")
    return SeccompPolicy(source, default, tuple(rules.values()))


def _parse_rule(line: str, lineno: int, where: str) -> Rule:
    match = _RULE.fullmatch(line)
    if match is None:
        raise SeccompPolicyError(f"{where}: expected 'syscall: condition', got {line!r}")
    name, body = match["name"], match["body"].strip()
    if not _NAME.fullmatch(name):
        raise SeccompPolicyError(f"{where}: {name!r} is not a syscall name")
    number = pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, name)
    # libseccomp gives negative pseudo-numbers to syscalls this architecture does not have.
    if number < 0:
        raise SeccompPolicyError(f"{where}: unknown syscall {name!r} on this architecture")
    if body == "1":
        return Rule(name, number, lineno)
    if ret := _RETURN.fullmatch(body):
        code = getattr(errno, ret["errno"], None)
        if not ret["errno"].startswith("E") or not isinstance(code, int):
            raise SeccompPolicyError(f"{where}: unknown errno {ret['errno']!r}")
        return Rule(name, number, lineno, errno=code)
    alternatives = tuple(
        _parse_alternative(alt, where) for alt in (a.strip() for a in body.split("||"))
    )
    return Rule(name, number, lineno, alternatives=alternatives)


def _parse_alternative(text: str, where: str) -> tuple[Comparison, ...]:
    comparisons = [_parse_comparison(c.strip(), where) for c in text.split("&&")]
    args = [c.arg for c in comparisons]
    if len(set(args)) != len(args):
        # libseccomp cannot test one argument twice in one rule; say so here, with the line.
        raise SeccompPolicyError(f"{where}: {text!r} tests one argument twice")
    return tuple(comparisons)


def _parse_comparison(text: str, where: str) -> Comparison:
    match = _COMPARISON.fullmatch(text)
    if match is None:
        raise SeccompPolicyError(
            f"{where}: bad condition {text!r}; expected 'argN OP VALUE' or 'argN & MASK == VALUE'"
        )
    arg = int(match["arg"])
    if arg > _MAX_ARG:
        raise SeccompPolicyError(f"{where}: arg{arg} does not exist; syscalls have arg0..arg5")
    value = _parse_value(match["value"], where)
    if match["mask"] is None:
        return Comparison(arg, match["op"], value)
    if match["op"] != "==":
        raise SeccompPolicyError(f"{where}: a masked test must use ==, not {match['op']}")
    mask = _parse_value(match["mask"], where)
    if value & ~mask:
        raise SeccompPolicyError(f"{where}: {text!r} can never hold (value has bits outside mask)")
    return Comparison(arg, "==", value, mask)


def _parse_value(text: str, where: str) -> int:
    value = 0
    for part in (p.strip() for p in text.split("|")):
        if _HEX.fullmatch(part):
            value |= int(part, 16)
        elif part.isascii() and part.isdigit():
            value |= int(part)
        elif part in CONSTANTS:
            value |= CONSTANTS[part]
        else:
            raise SeccompPolicyError(f"{where}: unknown constant {part!r}")
    if value >= _U64:
        raise SeccompPolicyError(f"{where}: {text.strip()!r} does not fit in 64 bits")
    return value


def read_policy(path: Path) -> SeccompPolicy:
    """Read and parse a policy file (OSError if it cannot be read)."""
    return parse_policy(path.read_text(encoding="utf-8"), str(path))


def compile_filter(policy: SeccompPolicy, action: str = "kill") -> pyseccomp.SyscallFilter:
    """Build the filter: `action="log"` logs what the policy does not allow instead of killing.

    Log mode is for finding a missing rule during development; the policy's own default
    applies otherwise (`kill`: the whole process dies of SIGSYS).
    """
    if action not in DEFAULT_ACTIONS:
        raise SeccompPolicyError(f"seccomp action must be one of {', '.join(DEFAULT_ACTIONS)}, "
                                 f"not {action!r}")
    default = DEFAULT_ACTIONS["log" if action == "log" else policy.default]
    flt = pyseccomp.SyscallFilter(default)
    # A syscall made through another ABI (int 0x80, x32) bypasses the table: treat it alike.
    flt.set_attr(pyseccomp.Attr.ACT_BADARCH, default)
    for rule in policy.rules:
        try:
            if rule.errno is not None:
                flt.add_rule(pyseccomp.ERRNO(rule.errno), rule.number)
            elif not rule.alternatives:
                flt.add_rule(pyseccomp.ALLOW, rule.number)
            for alternative in rule.alternatives:
                flt.add_rule(pyseccomp.ALLOW, rule.number, *(c.to_arg() for c in alternative))
        except OSError as exc:
            raise SeccompPolicyError(
                f"{policy.source}:{rule.line}: libseccomp refused the {rule.syscall} rule: "
                f"{exc.strerror}"
            ) from None
    return flt
