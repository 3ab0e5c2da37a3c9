"""`ringfence policy keygen | sign | verify`: one line of output each.

Exit codes: 0 done, 1 the signature does not verify, 2 a usage or file error. The main CLI
calls `add_policy_commands` on its subparsers; each command is its parsed `func(args) -> int`.
"""

from __future__ import annotations

import argparse
import sys

from broker.policy import (
    PolicyError,
    SignatureError,
    generate_keypair,
    sign_policy,
    verify_policy_file,
)

EXIT_OK = 0
EXIT_UNVERIFIED = 1
EXIT_USAGE = 2


def add_policy_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    policy = subparsers.add_parser("policy", help="make keys, sign and verify the broker policy")
    commands = policy.add_subparsers(dest="policy_command", required=True)

    keygen = commands.add_parser("keygen", help="write a new Ed25519 key pair: KEY (private, "
                                 "mode 0600) and KEY.pub")
    keygen.add_argument("--out", required=True, metavar="KEY")
    keygen.set_defaults(func=_keygen)

    sign = commands.add_parser("sign", help="sign POLICY with KEY into POLICY.sig")
    sign.add_argument("policy", metavar="POLICY")
    sign.add_argument("--key", required=True, metavar="KEY")
    sign.set_defaults(func=_sign)

    verify = commands.add_parser("verify", help="check POLICY and that POLICY.sig verifies "
                                 "against one of its trusted keys")
    verify.add_argument("policy", metavar="POLICY")
    verify.set_defaults(func=_verify)


def _keygen(args: argparse.Namespace) -> int:
    public = args.out + ".pub"
    try:
        generate_keypair(args.out, public)
    except PolicyError as exc:
        return _fail(exc, EXIT_USAGE)
    print(f"wrote private key {args.out} (mode 0600) and public key {public}; list {public} "
          "in broker.trusted_keys")
    return EXIT_OK


def _sign(args: argparse.Namespace) -> int:
    try:
        sig_path = sign_policy(args.policy, args.key)
    except PolicyError as exc:
        return _fail(exc, EXIT_USAGE)
    print(f"signed {args.policy} with {args.key} into {sig_path}")
    return EXIT_OK


def _verify(args: argparse.Namespace) -> int:
    try:
        policy, key = verify_policy_file(args.policy)
    except SignatureError as exc:
        return _fail(exc, EXIT_UNVERIFIED)
    except PolicyError as exc:
        return _fail(exc, EXIT_USAGE)
    print(f"policy {args.policy} verifies against trusted key {key} ({len(policy.vms)} VMs in "
          f"{len(policy.groups)} groups)")
    return EXIT_OK


def _fail(exc: PolicyError, code: int) -> int:
    print(f"ringfence: {exc}", file=sys.stderr)
    return code
