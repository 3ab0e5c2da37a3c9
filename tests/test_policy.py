"""The broker's policy file (broker/policy.py): validation, signatures and the policy CLI."""

from __future__ import annotations

import argparse
import base64
import logging
import os
import stat
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from broker.policy import (
    ALLOW_UNSIGNED_ENV,
    Disk,
    Group,
    MiB,
    Nic,
    PolicyError,
    Qos,
    SignatureError,
    admin_socket_path,
    disk_socket_path,
    generate_keypair,
    load_policy,
    nic_socket_path,
    parse_policy,
    sign_policy,
    verify_policy_bytes,
    verify_policy_file,
    vm_socket_dir,
)
from broker.policy_cli import add_policy_commands
from fuzz._harness import time_limit

ROOT = "/srv/images"

BROKER = f"""\
[broker]
image_roots = ["{ROOT}", "/srv/more"]
run_dir = "/run/rf"
backend_user = "ringfence"
admin_group = "ringfence-admin"
trusted_keys = ["/etc/rf/ops.pub"]
"""

EXAMPLE = BROKER + """\
seccomp = "log"

[groups.tenant-a]
[groups.tenant-b]

[vms.web1]
group = "tenant-a"
user = "vm-web1"
memory = "512M"
kernel = "/boot/vmlinuz"
initrd = "/boot/initrd"
append = "console=ttyS0"
num_queues = 2
qos = { weight = 2, priority = "high", iops_limit = 20000, bps_limit = "200M", burst = "2x" }
disks = [
    { image = "web1.raw", readonly = false },
    { image = "/srv/images/base.iso", readonly = true },
]

[vms.db1]
group = "tenant-b"
user = 2001
disks = [ { image = "base.iso", readonly = true } ]
"""


def parse(text: str, source: str = "/etc/rf/policy.toml"):
    return parse_policy(text.encode(), source)


def refusal(text: str) -> str:
    """The one-sentence error for `text`, checked for the operator-facing shape."""
    with pytest.raises(PolicyError) as info:
        parse(text)
    message = str(info.value)
    assert message.startswith("policy /etc/rf/policy.toml")
    assert "\n" not in message and "; " in message, message
    return message


def line_of(text: str, needle: str) -> int:
    return next(n for n, line in enumerate(text.splitlines(), 1) if needle in line)


# --- valid policies ---------------------------------------------------------------------------


def test_example_policy_parses_into_frozen_dataclasses() -> None:
    policy = parse(EXAMPLE)
    assert policy.broker.image_roots == (ROOT, "/srv/more")
    assert policy.broker.backend_user == "ringfence"
    assert policy.broker.admin_group == "ringfence-admin"
    assert policy.broker.seccomp == "log" and policy.broker.allow_unsigned is False
    assert policy.groups == {"tenant-a": Group("tenant-a"), "tenant-b": Group("tenant-b")}
    web1 = policy.vms["web1"]
    assert (web1.group, web1.user, web1.memory_bytes, web1.num_queues) == ("tenant-a", "vm-web1",
                                                                           512 * MiB, 2)
    assert (web1.kernel, web1.initrd, web1.append) == ("/boot/vmlinuz", "/boot/initrd",
                                                       "console=ttyS0")
    assert web1.qos == Qos(weight=2, priority="high", iops_limit=20000, bps_limit=200 * MiB,
                           burst=2.0)
    assert web1.disks == (Disk("web1.raw", False), Disk("/srv/images/base.iso", True))
    assert policy.vms["db1"].user == 2001
    assert [vm.name for vm in policy.vms_in_group("tenant-b")] == ["db1"]
    with pytest.raises(AttributeError):
        web1.group = "tenant-b"  # type: ignore[misc]


def test_optional_settings_take_their_defaults() -> None:
    policy = parse(BROKER.replace('admin_group = "ringfence-admin"\n', "")
                   + '[groups.g]\n[vms.v]\ngroup = "g"\nuser = "vm-v"\n')
    assert policy.broker.admin_group is None and policy.broker.seccomp == "kill"
    vm = policy.vms["v"]
    assert (vm.memory_bytes, vm.num_queues, vm.kernel, vm.disks) == (256 * MiB, 1, None, ())
    assert vm.qos == Qos()


def test_socket_paths_derive_from_run_dir() -> None:
    settings = parse(EXAMPLE).broker
    assert vm_socket_dir(settings, "web1") == "/run/rf/vms/web1"
    assert disk_socket_path(settings, "web1", 1) == "/run/rf/vms/web1/disk1.sock"
    assert admin_socket_path(settings) == "/run/rf/admin.sock"


@pytest.mark.parametrize(("written", "size"), [
    ('"4096"', 4096), ("8192", 8192), ('"512K"', 512 << 10), ('"200M"', 200 * MiB),
    ('"1G"', 1 << 30), ('"1g"', 1 << 30), ('"2T"', 2 << 40),
])
def test_sizes_accept_bytes_and_binary_suffixes(written: str, size: int) -> None:
    policy = parse(BROKER + f'[groups.g]\n[vms.v]\ngroup = "g"\nuser = "u"\n'
                   f"qos = {{ bps_limit = {written} }}\n")
    assert policy.vms["v"].qos.bps_limit == size


def test_numeric_user_given_as_string_is_a_uid() -> None:
    policy = parse(BROKER.replace('"ringfence"', '"999"'))
    assert policy.broker.backend_user == 999


def test_shared_image_is_fine_when_every_use_is_readonly() -> None:
    policy = parse(EXAMPLE)  # base.iso: web1 by absolute path, db1 relative, both readonly
    assert policy.vms["db1"].disks[0].readonly


def test_allow_unsigned_permits_an_empty_key_list() -> None:
    policy = parse(BROKER.replace('["/etc/rf/ops.pub"]', "[]") + "allow_unsigned = true\n")
    assert policy.broker.allow_unsigned and policy.broker.trusted_keys == ()


# --- refusals ---------------------------------------------------------------------------------


def test_toml_syntax_error_names_line_and_column() -> None:
    text = BROKER + "[vms.web1]\ngroup = \n"
    message = refusal(text)
    assert f"line {line_of(text, '[vms.web1]') + 1} column" in message
    assert "fix the TOML syntax" in message


def test_unterminated_string_is_reported_at_the_end() -> None:
    assert "at the end" in refusal(BROKER + 'seccomp = "kill\n'.replace("\n", ""))


def test_non_utf8_policy_refused() -> None:
    with pytest.raises(PolicyError, match="not UTF-8"):
        parse_policy(BROKER.encode() + b"# \xff\n", "/etc/rf/policy.toml")


def test_unknown_key_names_its_line() -> None:
    text = EXAMPLE.replace('num_queues = 2', 'num_queues = 2\nnetworks = []')
    message = refusal(text)
    assert f"line {line_of(text, 'networks')}:" in message
    assert "unknown key vms.web1.networks" in message


def test_unknown_key_inside_a_disk_names_the_disks_line() -> None:
    text = EXAMPLE.replace('{ image = "base.iso", readonly = true }',
                           '{ image = "base.iso", read_only = true }')
    message = refusal(text)
    assert f"line {line_of(text, 'read_only')}:" in message
    assert "vms.db1.disks[0].read_only" in message


def test_unknown_table_refused() -> None:
    assert "unknown key networks" in refusal(EXAMPLE + "[networks]\n")


def test_missing_required_key_names_the_table_header() -> None:
    text = EXAMPLE.replace('group = "tenant-b"\n', "")
    message = refusal(text)
    assert f"line {line_of(text, '[vms.db1]')}:" in message
    assert "vms.db1.group is missing" in message


def test_missing_broker_table_refused() -> None:
    assert "the [broker] table is missing" in refusal("[groups.g]\n")


def test_vm_naming_a_missing_group_names_the_group_line() -> None:
    text = EXAMPLE.replace('group = "tenant-b"', 'group = "tenant-z"')
    message = refusal(text)
    assert f"line {line_of(text, 'tenant-z')}:" in message and "[groups.tenant-z]" in message


@pytest.mark.parametrize("header", ['[vms."Web1"]', '[vms."a.b"]', '[vms."-x"]',
                                    '[vms.' + "a" * 33 + "]"])
def test_bad_vm_names_refused(header: str) -> None:
    text = BROKER + "[groups.g]\n" + header + '\ngroup = "g"\nuser = "u"\n'
    message = refusal(text)
    assert "vm name" in message and f"line {line_of(text, header)}:" in message


def test_bad_group_name_refused() -> None:
    assert "group name 'Tenant'" in refusal(BROKER + '[groups."Tenant"]\n')


def test_group_settings_are_unknown_keys() -> None:
    assert "unknown key groups.g.cpus" in refusal(BROKER + "[groups.g]\ncpus = 2\n")


@pytest.mark.parametrize(("old", "new", "needle"), [
    ('num_queues = 2', 'num_queues = true', "vms.web1.num_queues must be an integer"),
    ('num_queues = 2', 'num_queues = "2"', "vms.web1.num_queues must be an integer"),
    ('readonly = false', 'readonly = "no"', "vms.web1.disks[0].readonly must be true or false"),
    (f'image_roots = ["{ROOT}", "/srv/more"]', f'image_roots = "{ROOT}"',
     "broker.image_roots must be a list"),
    (f'image_roots = ["{ROOT}", "/srv/more"]', 'image_roots = [1]',
     "broker.image_roots must be a list of strings"),
    ('qos = {', 'qos = 1\nx = {', "vms.web1.qos must be a table"),
    ('disks = [ {', 'disks = [ "web1.raw", {', "vms.db1.disks[0] must be a table"),
    ('append = "console=ttyS0"', 'append = 1', "vms.web1.append must be a string"),
])
def test_wrong_types_refused(old: str, new: str, needle: str) -> None:
    assert old in EXAMPLE
    assert needle in refusal(EXAMPLE.replace(old, new, 1))


@pytest.mark.parametrize(("old", "new"), [
    ('run_dir = "/run/rf"', 'run_dir = "run/rf"'),
    ('run_dir = "/run/rf"', 'run_dir = "/run/rf/"'),
    (f'"{ROOT}"', '"/srv/images/../etc"'),
    (f'"{ROOT}"', '"/srv//images"'),
    ('"/etc/rf/ops.pub"', '"ops.pub"'),
    ('kernel = "/boot/vmlinuz"', 'kernel = "vmlinuz"'),
])
def test_paths_must_be_plain_and_absolute(old: str, new: str) -> None:
    assert "not a plain absolute path" in refusal(EXAMPLE.replace(old, new, 1))


def test_filesystem_root_as_image_root_refused() -> None:
    assert "expose every file" in refusal(EXAMPLE.replace(f'"{ROOT}"', '"/"'))


def test_empty_image_roots_refused() -> None:
    assert "image_roots is empty" in refusal(
        EXAMPLE.replace(f'image_roots = ["{ROOT}", "/srv/more"]', "image_roots = []"))


@pytest.mark.parametrize("bad", ['"1.5G"', '"-1"', '"0"', "0", '""', '"1P"', "true", '"1 G"'])
def test_bad_sizes_refused(bad: str) -> None:
    assert "vms.web1.qos.bps_limit must be a positive size" in refusal(
        EXAMPLE.replace('bps_limit = "200M"', f"bps_limit = {bad}"))


def test_memory_must_be_whole_mib() -> None:
    assert "whole number of MiB" in refusal(EXAMPLE.replace('"512M"', '"1000K"'))


@pytest.mark.parametrize("n", [0, 65])
def test_num_queues_out_of_range_refused(n: int) -> None:
    assert "use 1 to 64" in refusal(EXAMPLE.replace("num_queues = 2", f"num_queues = {n}"))


@pytest.mark.parametrize(("old", "new", "needle"), [
    ("weight = 2", "weight = 0", "qos.weight is 0"),
    ('priority = "high"', 'priority = "urgent"', "use one of low, normal, high"),
    ("iops_limit = 20000", "iops_limit = 0", "iops_limit must be positive"),
    ('burst = "2x"', 'burst = "2"', "burst is '2'"),
    ('burst = "2x"', 'burst = "0.5x"', "from 1x to 100x"),
    ('burst = "2x"', 'burst = "2x", share = 1', "unknown key vms.web1.qos.share"),
])
def test_bad_qos_refused(old: str, new: str, needle: str) -> None:
    assert needle in refusal(EXAMPLE.replace(old, new, 1))


def test_initrd_without_kernel_refused() -> None:
    text = EXAMPLE.replace('kernel = "/boot/vmlinuz"\n', "")
    message = refusal(text)
    assert "without kernel" in message and f"line {line_of(text, 'initrd')}:" in message


@pytest.mark.parametrize(("old", "new"), [
    ('backend_user = "ringfence"', 'backend_user = "root"'),
    ('backend_user = "ringfence"', "backend_user = 0"),
    ("user = 2001", 'user = "0"'),
])
def test_root_as_backend_or_qemu_user_refused(old: str, new: str) -> None:
    assert "undo the privilege split" in refusal(EXAMPLE.replace(old, new))


@pytest.mark.parametrize("bad", ['"Bad User"', "-1", "4294967295", "1.5", '"x;y"', '"١٢٣"'])
def test_bad_accounts_refused(bad: str) -> None:
    assert "must be a user or group name" in refusal(EXAMPLE.replace("user = 2001",
                                                                     f"user = {bad}"))


@pytest.mark.parametrize(("image", "needle"), [
    ("../web1.raw", "has a '..' component"),
    ("sub/../web1.raw", "has a '..' component"),
    ("./web1.raw", "has a '.' component"),
    ("sub//web1.raw", "has an empty component"),
    ("/srv/images/../../etc/shadow", "has a '..' component"),
    ("/etc/shadow", "is outside every image root"),
    ("/srv/imagesX/web1.raw", "is outside every image root"),
    ("/srv/images", "is outside every image root"),
])
def test_bad_image_paths_refused_on_the_disks_line(image: str, needle: str) -> None:
    text = EXAMPLE.replace('image = "web1.raw"', f'image = "{image}"')
    message = refusal(text)
    assert needle in message
    assert f"line {line_of(text, 'disks = [')}:" in message  # web1's, the first


def test_writable_image_used_by_two_vms_refused() -> None:
    text = EXAMPLE.replace('{ image = "base.iso", readonly = true }', '{ image = "web1.raw" }')
    message = refusal(text)
    assert "image web1.raw of vm db1 is also a disk of vm web1" in message
    assert f"line {line_of(text, '[vms.db1]') + 3}:" in message  # db1's disks line


def test_image_shared_readonly_and_writable_refused() -> None:
    text = EXAMPLE.replace('{ image = "base.iso", readonly = true }',
                           '{ image = "/srv/images/base.iso", readonly = false }')
    assert "also a disk of vm web1" in refusal(text)


def test_same_writable_image_twice_in_one_vm_refused() -> None:
    text = EXAMPLE.replace('{ image = "base.iso", readonly = true }',
                           '{ image = "x.raw" }, { image = "/srv/more/x.raw" }')
    assert "image /srv/more/x.raw of vm db1 is also a disk of vm db1" in refusal(text)


def test_empty_trusted_keys_refused_without_allow_unsigned() -> None:
    assert "no signature can verify" in refusal(EXAMPLE.replace('["/etc/rf/ops.pub"]', "[]"))


def test_bad_seccomp_action_refused() -> None:
    assert "use one of kill, log" in refusal(EXAMPLE.replace('"log"', '"trap"'))


def test_run_dir_too_long_for_socket_paths_refused() -> None:
    text = EXAMPLE.replace('"/run/rf"', '"/run/' + "r" * 90 + '"')
    message = refusal(text)
    assert "longer than 107 bytes" in message and f"line {line_of(text, 'run_dir')}:" in message


def one_line(message: str) -> None:
    assert len(message.splitlines()) == 1, message
    assert not any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in message), message


@pytest.mark.parametrize(("old", "new", "shown"), [
    # A quoted key can hold any character: the unknown-key error shows it escaped.
    ('seccomp = "log"', 'seccomp = "log"\n"a\\nb" = 1', r"unknown key 'broker.a\nb'"),
    ('[groups.tenant-b]', '[groups.tenant-b]\n"\\u001b[2J" = 1',
     r"unknown key 'groups.tenant-b.\x1b[2J'"),
    # An image name travels into split_image_path's ImageError.
    ('image = "web1.raw"', 'image = "/etc/x\\ny"', r"image '/etc/x\ny' is outside"),
    ('image = "web1.raw"', 'image = "a\\r/../b"', r"image 'a\r/../b' has a '..' component"),
    # And the run_dir, in the socket paths derived from it.
    ('"/run/rf"', '"/run/\\u001b[31m' + "r" * 90 + '"', r"socket path '/run/\x1b[31mrrr"),
    # A group name that is not declared.
    ('group = "tenant-b"', 'group = "x\\u2028y"', r"names group 'x\u2028y'"),
])
def test_file_supplied_text_in_errors_is_escaped_so_each_error_is_one_line(
        old: str, new: str, shown: str) -> None:
    text = EXAMPLE.replace(old, new, 1)
    assert text != EXAMPLE
    message = refusal(text)
    one_line(message)
    assert shown in message


def test_image_roots_listed_in_an_error_are_escaped() -> None:
    text = EXAMPLE.replace('"/srv/more"', '"/srv/mo\\u0085re"')
    text = text.replace('image = "web1.raw"', 'image = "/etc/shadow"')
    message = refusal(text)
    one_line(message)
    assert r"image /etc/shadow is outside every image root (/srv/images, '/srv/mo\x85re')" \
        in message


def test_shared_image_with_a_newline_in_its_name_is_reported_on_one_line() -> None:
    text = EXAMPLE.replace('{ image = "web1.raw", readonly = false }',
                           '{ image = "we\\nb1.raw", readonly = false }')
    text = text.replace('{ image = "base.iso", readonly = true }', '{ image = "we\\nb1.raw" }')
    message = refusal(text)
    one_line(message)
    assert r"image 'we\nb1.raw' of vm db1 is also a disk of vm web1" in message


def test_plain_names_in_errors_are_shown_without_quotes() -> None:
    assert "unknown key vms.web1.networks;" in refusal(
        EXAMPLE.replace('num_queues = 2', 'num_queues = 2\nnetworks = 1'))


@pytest.mark.parametrize("line", [" " * 65536, "#" + " " * 65535, "\t " * 32768 + "# x",
                                  'append2 = "' + " " * 65536 + '"'])
def test_a_64_kib_blank_comment_or_key_line_parses_in_well_under_a_second(line: str) -> None:
    # The broker parses before checking the signature; a cubic key regex once took hours here.
    text = EXAMPLE.replace("[groups.tenant-a]", line + "\n[groups.tenant-a]")
    start = time.perf_counter()
    with time_limit(10.0):  # CPU seconds: a regression fails here instead of hanging the run
        if line.startswith("append2"):
            assert "unknown key broker.append2" in refusal(text)
        else:
            parse(text)
    assert time.perf_counter() - start < 1.0  # a few milliseconds; generous so it never flakes


@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_line_numbers_count_only_toml_newlines(newline: str) -> None:
    """U+2028 and \\x85 inside a comment end no TOML line, so they must not shift the line an
    error names; CRLF files number their lines like LF ones."""
    text = EXAMPLE.replace("num_queues = 2", "num_queues = 2 # a\u2028b\x85c\nbogus = 1")
    text = text.replace("\n", newline)
    line = text.split(newline).index("bogus = 1") + 1
    message = refusal(text)
    assert f":{line}:" in message or f"line {line}" in message, message


def test_quoted_keys_and_dotted_tables_still_name_their_line() -> None:
    text = EXAMPLE.replace('num_queues = 2', 'num_queues = 2\n\n  "net.works"  = 1')
    message = refusal(text)
    assert "unknown key vms.web1.net.works;" in message
    assert f"line {line_of(text, 'net.works')}:" in message
    text = EXAMPLE.replace('[vms.db1]', '[ vms . "db1" ]  # the database').replace(
        'user = 2001', 'user = 2001\nspeed = 1')
    assert f"line {line_of(text, 'speed')}:" in refusal(text)


# --- keys and signatures ----------------------------------------------------------------------


@pytest.fixture
def keys(tmp_path: Path) -> tuple[str, str]:
    private = str(tmp_path / "ops.key")
    generate_keypair(private, private + ".pub")
    return private, private + ".pub"


def write_policy(tmp_path: Path, public_key: str, extra: str = "") -> str:
    images = tmp_path / "images"
    images.mkdir(exist_ok=True)
    text = (EXAMPLE.replace(f'["{ROOT}", "/srv/more"]', f'["{images}"]')
            .replace('"/srv/images/base.iso"', f'"{images}/base.iso"')
            .replace('"/etc/rf/ops.pub"', f'"{public_key}"') + extra)
    path = tmp_path / "policy.toml"
    path.write_text(text)
    return str(path)


def test_keygen_writes_a_private_key_only_root_can_read(keys: tuple[str, str]) -> None:
    private, public = keys
    assert stat.S_IMODE(os.stat(private).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(public).st_mode) == 0o644
    assert b"PRIVATE KEY" in Path(private).read_bytes()
    assert b"PUBLIC KEY" in Path(public).read_bytes()


def test_keygen_refuses_to_overwrite(keys: tuple[str, str], tmp_path: Path) -> None:
    private, public = keys
    before = Path(private).read_bytes()
    with pytest.raises(PolicyError, match="already exists; refusing to overwrite"):
        generate_keypair(private, str(tmp_path / "new.pub"))
    assert Path(private).read_bytes() == before and not (tmp_path / "new.pub").exists()
    with pytest.raises(PolicyError, match="already exists"):
        generate_keypair(str(tmp_path / "new.key"), public)
    assert not (tmp_path / "new.key").exists()  # no half key pair left behind


def test_signed_policy_loads(tmp_path: Path, keys: tuple[str, str]) -> None:
    path = write_policy(tmp_path, keys[1])
    assert sign_policy(path, keys[0]) == path + ".sig"
    assert set(load_policy(path).vms) == {"web1", "db1"}
    assert verify_policy_file(path)[1] == keys[1]


def test_one_changed_byte_breaks_the_signature(tmp_path: Path, keys: tuple[str, str]) -> None:
    path = write_policy(tmp_path, keys[1])
    sign_policy(path, keys[0])
    data = bytearray(Path(path).read_bytes())
    data[data.index(b"512M")] = ord("6")  # 612M: still a valid policy, no longer the signed one
    Path(path).write_bytes(bytes(data))
    with pytest.raises(SignatureError) as info:
        load_policy(path)
    assert str(info.value) == (f"policy {path}: signature does not verify against any trusted "
                               "key; re-sign it with `ringfence policy sign`")


def test_signature_by_an_untrusted_key_refused(tmp_path: Path, keys: tuple[str, str]) -> None:
    path = write_policy(tmp_path, keys[1])
    other = str(tmp_path / "other.key")
    generate_keypair(other, other + ".pub")
    sign_policy(path, other)
    with pytest.raises(SignatureError, match="does not verify against any trusted key"):
        load_policy(path)


def test_unsigned_policy_refused(tmp_path: Path, keys: tuple[str, str]) -> None:
    path = write_policy(tmp_path, keys[1])
    with pytest.raises(SignatureError, match=r"signature file .*\.sig is missing; sign the "
                       r"policy with `ringfence policy sign"):
        load_policy(path)


def test_allow_unsigned_in_the_file_alone_is_refused(
        tmp_path: Path, keys: tuple[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Whoever can edit the policy could set allow_unsigned: only an environment the file
    cannot touch (RINGFENCE_ALLOW_UNSIGNED=1, set by root for development) makes it count."""
    monkeypatch.delenv(ALLOW_UNSIGNED_ENV, raising=False)
    path = write_policy(tmp_path, keys[1])
    text = Path(path).read_text().replace("[broker]\n", "[broker]\nallow_unsigned = true\n")
    Path(path).write_text(text)
    with pytest.raises(SignatureError, match=rf"policy {path} sets allow_unsigned = true, which "
                       rf"is honoured only with {ALLOW_UNSIGNED_ENV}=1 in the environment"):
        load_policy(path)
    sign_policy(path, keys[0])  # signed or not, a production policy must not carry it
    monkeypatch.setenv(ALLOW_UNSIGNED_ENV, "0")
    with pytest.raises(SignatureError, match="honoured only with"):
        load_policy(path)


def test_allow_unsigned_loads_without_a_signature_and_warns(
        tmp_path: Path, keys: tuple[str, str], caplog: pytest.LogCaptureFixture,
        unsigned_policies_allowed: None) -> None:
    path = write_policy(tmp_path, keys[1])
    text = Path(path).read_text().replace("[broker]\n", "[broker]\nallow_unsigned = true\n")
    Path(path).write_text(text)
    with caplog.at_level(logging.WARNING, logger="broker.policy"):
        policy = load_policy(path)
    assert policy.broker.allow_unsigned
    assert any(r.levelno == logging.WARNING and "WITHOUT checking its signature" in r.message
               for r in caplog.records)
    with pytest.raises(SignatureError):  # `verify` still checks: it is what the operator asked
        verify_policy_file(path)


def test_malformed_signature_file_refused(tmp_path: Path, keys: tuple[str, str]) -> None:
    path = write_policy(tmp_path, keys[1])
    Path(path + ".sig").write_text("not base64!\n")
    with pytest.raises(SignatureError, match="is not a base64 Ed25519 signature"):
        load_policy(path)
    Path(path + ".sig").write_text(base64.b64encode(b"short").decode())
    with pytest.raises(SignatureError, match="is not a base64 Ed25519 signature"):
        load_policy(path)


def test_trusted_key_writable_by_others_refused(tmp_path: Path, keys: tuple[str, str]) -> None:
    path = write_policy(tmp_path, keys[1])
    sign_policy(path, keys[0])
    os.chmod(keys[1], 0o666)
    with pytest.raises(PolicyError, match="can be changed by users other than root"):
        load_policy(path)


def test_trusted_key_owned_by_another_user_refused(tmp_path: Path,
                                                   keys: tuple[str, str]) -> None:
    path = write_policy(tmp_path, keys[1])
    sign_policy(path, keys[0])
    os.chown(keys[1], 65534, 65534)
    with pytest.raises(PolicyError, match="can be changed by users other than root"):
        load_policy(path)


def test_trusted_key_that_is_not_an_ed25519_public_key_refused(
        tmp_path: Path, keys: tuple[str, str]) -> None:
    path = write_policy(tmp_path, keys[1])
    sign_policy(path, keys[0])
    Path(keys[1]).write_bytes(Path(keys[0]).read_bytes())  # the private key, by mistake
    with pytest.raises(PolicyError, match="is not a PEM Ed25519 public key"):
        load_policy(path)


def test_missing_trusted_key_refused(tmp_path: Path, keys: tuple[str, str]) -> None:
    path = write_policy(tmp_path, keys[1])
    sign_policy(path, keys[0])
    os.unlink(keys[1])
    with pytest.raises(PolicyError, match=r"trusted key .* cannot be read: No such file"):
        load_policy(path)


def test_trusted_key_path_from_the_policy_is_escaped_in_its_error(tmp_path: Path) -> None:
    # The key list comes from the policy file itself, read before anything verifies it.
    path = write_policy(tmp_path, "/etc/rf/o\\nps.pub")
    Path(path + ".sig").write_bytes(base64.b64encode(bytes(64)) + b"\n")
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    message = str(info.value)
    one_line(message)
    assert message.startswith(r"trusted key '/etc/rf/o\nps.pub' cannot be read: ")


def test_sign_refuses_an_invalid_policy(tmp_path: Path, keys: tuple[str, str]) -> None:
    path = write_policy(tmp_path, keys[1], "bogus = 1\n")
    with pytest.raises(PolicyError, match="unknown key"):
        sign_policy(path, keys[0])
    assert not os.path.exists(path + ".sig")


def test_sign_refuses_a_file_that_is_not_a_private_key(tmp_path: Path,
                                                       keys: tuple[str, str]) -> None:
    path = write_policy(tmp_path, keys[1])
    with pytest.raises(PolicyError, match="is not an unencrypted PEM Ed25519 private key"):
        sign_policy(path, keys[1])


def test_verify_policy_bytes_names_the_key_that_verifies() -> None:
    first, second = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    keys = [first.public_key(), second.public_key()]
    signature = second.sign(b"policy")
    assert verify_policy_bytes(b"policy", signature, keys) == 1
    assert verify_policy_bytes(b"policy!", signature, keys) is None
    assert verify_policy_bytes(b"policy", signature, []) is None


# --- the CLI ----------------------------------------------------------------------------------


def run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="ringfence")
    add_policy_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_keygen_sign_verify_round_trip(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    key = str(tmp_path / "ops.key")
    assert run_cli("policy", "keygen", "--out", key) == 0
    path = write_policy(tmp_path, key + ".pub")
    assert run_cli("policy", "sign", path, "--key", key) == 0
    assert run_cli("policy", "verify", path) == 0
    out = capsys.readouterr()
    lines = out.out.splitlines()
    assert len(lines) == 3 and out.err == ""
    assert lines[0].startswith(f"wrote private key {key} (mode 0600)")
    assert lines[1] == f"signed {path} with {key} into {path}.sig"
    assert lines[2] == (f"policy {path} verifies against trusted key {key}.pub "
                        "(2 VMs in 2 groups)")


def test_cli_verify_of_a_tampered_policy_exits_1(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    key = str(tmp_path / "ops.key")
    run_cli("policy", "keygen", "--out", key)
    path = write_policy(tmp_path, key + ".pub")
    run_cli("policy", "sign", path, "--key", key)
    with open(path, "a") as f:
        f.write("# edited\n")
    capsys.readouterr()
    assert run_cli("policy", "verify", path) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "signature does not verify" in err


@pytest.mark.parametrize("argv", [
    ("policy", "keygen", "--out", "{tmp}/ops.key"),  # exists already
    ("policy", "sign", "{tmp}/policy.toml", "--key", "{tmp}/missing.key"),
    ("policy", "verify", "{tmp}/missing.toml"),
])
def test_cli_file_errors_exit_2_with_one_line(argv: tuple[str, ...], tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    run_cli("policy", "keygen", "--out", f"{tmp_path}/ops.key")
    write_policy(tmp_path, f"{tmp_path}/ops.key.pub")
    capsys.readouterr()
    assert run_cli(*(arg.format(tmp=tmp_path) for arg in argv)) == 2
    err = capsys.readouterr().err
    assert err.startswith("ringfence: ") and err.count("\n") == 1


def test_cli_usage_errors_exit_2() -> None:
    with pytest.raises(SystemExit) as info:
        run_cli("policy", "sign", "policy.toml")  # no --key
    assert info.value.code == 2


def test_shipped_example_policy_parses_with_its_vms_and_groups() -> None:
    path = Path(__file__).resolve().parent.parent / "policies" / "example-vms.toml"
    policy = parse_policy(path.read_bytes(), str(path))
    assert sorted(policy.groups) == ["tenant-a", "tenant-b"]
    assert [vm.name for vm in policy.vms_in_group("tenant-a")] == ["web1"]
    assert policy.vms["web1"].disks[1].readonly
    assert policy.vms["web1"].nics[0].tap == "rf-web1-0"


# --- NICs -------------------------------------------------------------------------------------

NIC = '{ tap = "rf-web1-0", bridge = "br-tenant-a", mac = "52:54:00:12:34:56" }'
NIC_VM = BROKER + f"""\
[groups.g]
[vms.web1]
group = "g"
user = "vm-web1"
nics = [ {NIC} ]
"""


def nic_policy(nic: str) -> str:
    return NIC_VM.replace(NIC, nic)


def test_nic_parses_with_defaults() -> None:
    policy = parse(NIC_VM)
    assert policy.vms["web1"].nics == (Nic("rf-web1-0", "br-tenant-a", "52:54:00:12:34:56", 1500,
                                           1),)
    assert nic_socket_path(policy.broker, "web1", 0) == "/run/rf/vms/web1/nic0.sock"


def test_nic_settings_are_read() -> None:
    policy = parse(nic_policy('{ tap = "t0", bridge = "br0.100", mac = "52:54:00:AB:CD:EF", '
                              'mtu = 9000, queues = 1 }'))
    assert policy.vms["web1"].nics == (Nic("t0", "br0.100", "52:54:00:ab:cd:ef", 9000, 1),)


def test_nic_queue_pairs_up_to_eight_are_accepted() -> None:
    policy = parse(nic_policy('{ tap = "t0", bridge = "br0", mac = "52:54:00:12:34:56", '
                              'queues = 8 }'))
    assert policy.vms["web1"].nics[0].queues == 8


@pytest.mark.parametrize(("nic", "needle"), [
    ('{ tap = "rf-web1-verylong0", bridge = "br0", mac = "52:54:00:12:34:56" }', ".tap is"),
    ('{ tap = "Tap0", bridge = "br0", mac = "52:54:00:12:34:56" }', ".tap is"),
    ('{ tap = "t/0", bridge = "br0", mac = "52:54:00:12:34:56" }', ".tap is"),
    ('{ tap = "", bridge = "br0", mac = "52:54:00:12:34:56" }', ".tap is"),
    ('{ tap = "t0", bridge = "br 0", mac = "52:54:00:12:34:56" }', ".bridge is"),
    ('{ tap = "t0", bridge = "br0", mac = "52-54-00-12-34-56" }', "six hex bytes"),
    ('{ tap = "t0", bridge = "br0", mac = "01:00:5e:00:00:01" }', "multicast or zero"),
    ('{ tap = "t0", bridge = "br0", mac = "00:00:00:00:00:00" }', "multicast or zero"),
    ('{ tap = "t0", bridge = "br0", mac = "52:54:00:12:34:56", mtu = 67 }', "mtu is 67"),
    ('{ tap = "t0", bridge = "br0", mac = "52:54:00:12:34:56", mtu = 65501 }', "mtu is 65501"),
    ('{ tap = "t0", bridge = "br0", mac = "52:54:00:12:34:56", queues = 0 }', "queues is 0"),
    ('{ tap = "t0", bridge = "br0", mac = "52:54:00:12:34:56", queues = 9 }',
     "queues is 9; use 1 to 8"),
    ('{ tap = "t0", bridge = "br0", mac = "52:54:00:12:34:56", vlan = 2 }',
     "unknown key vms.web1.nics[0].vlan"),
    ('{ tap = "t0", mac = "52:54:00:12:34:56" }', "bridge is missing"),
])
def test_bad_nics_refused(nic: str, needle: str) -> None:
    assert needle in refusal(nic_policy(nic))


@pytest.mark.parametrize(("second", "needle"), [
    ('{ tap = "rf-web1-0", bridge = "br0", mac = "52:54:00:00:00:02" }', "tap rf-web1-0"),
    ('{ tap = "rf-db1-0", bridge = "br0", mac = "52:54:00:12:34:56" }', "mac 52:54:00:12:34:56"),
])
def test_tap_names_and_macs_are_unique_across_vms(second: str, needle: str) -> None:
    text = NIC_VM + f'[vms.db1]\ngroup = "g"\nuser = "vm-db1"\nnics = [ {second} ]\n'
    message = refusal(text)
    assert needle in message and "also used by vm" in message
