"""What an option's text becomes (key files, origin lists, chat templates, the default verify
rate) and the checks its value must pass, each naming the bad value; used by peers/config.py."""

import argparse
import re

MAX_PORT = 65535
ORIGIN = re.compile(r"[a-z][a-z0-9+.-]*://[^/\s]+")  # what a browser's Origin header holds
LOOPBACK = ("127.0.0.1", "::1", "localhost")
MIN_KEY_CHARS = 8  # an API key's or the metrics key's
OPEN_SWARM_VERIFY_RATE = 0.05  # strangers may join: check one request in 20 (costs under 10%, README)


def on_off(text: str) -> bool:
    """`on` or `off` as a bool (a switch whose default is on, inside nested settings)."""
    if text not in ("on", "off"):
        raise argparse.ArgumentTypeError(f"expected on or off, got {text!r}")
    return text == "on"


def check_port(name: str, port: int) -> None:
    if not 0 < port <= MAX_PORT:
        raise ValueError(f"{name} must be in 1..{MAX_PORT}, got {port}")


def check_share(name: str, value: float) -> None:
    if not 0 <= value <= 1:
        raise ValueError(f"{name} must be in [0, 1], got {value}")


def check_served_names(name: str, names: tuple[str, ...]) -> None:
    for served in names:
        if not served.strip() or served != served.strip():
            raise ValueError(
                f"a served model name is a non-empty name without spaces around it, got {served!r}"
            )
    if len(set(names)) < len(names):
        raise ValueError(f"served model names repeat: {', '.join(names)}")


def check_origins(name: str, origins: tuple[str, ...]) -> None:
    for origin in origins:
        if origin != "*" and not ORIGIN.fullmatch(origin):
            raise ValueError(f"an allowed origin is * or SCHEME://HOST[:PORT] without a path, got {origin!r}")


def check_key(name: str, key: str | None) -> None:
    """An API or metrics key: at least MIN_KEY_CHARS printable characters, no spaces."""
    if key is not None and (len(key) < MIN_KEY_CHARS or not key.isprintable() or " " in key):
        raise ValueError(f"{name} must be at least {MIN_KEY_CHARS} printable characters without spaces")


def read_swarm_key(args: argparse.Namespace) -> bytes | None:
    """--swarm-key, else LAYERSWARM_SWARM_KEY."""
    from peers.transport.auth import swarm_key_from

    return swarm_key_from(args.swarm_key)


def read_api_keys(args: argparse.Namespace) -> tuple[str, ...]:
    """--api-key values and the lines of --api-key-file (blank lines and # comments skipped)."""
    keys = list(args.api_key or ())
    if args.api_key_file:
        with open(args.api_key_file) as f:
            keys += [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]
    for key in keys:
        if len(key) < MIN_KEY_CHARS or not key.isprintable() or " " in key:
            raise ValueError(f"an API key has at least {MIN_KEY_CHARS} printable characters and no spaces")
    return tuple(keys)


def read_origins(value: str | None) -> tuple[str, ...]:
    """--allowed-origins: a comma-separated list."""
    return tuple(o.strip() for o in (value or "").split(",") if o.strip())


def read_chat_template(value: str | None) -> str | None:
    """--chat-template: a file's text, or the argument itself if it is a template (it holds "{%"
    or "{{"); checked to compile here, before the model loads."""
    from pathlib import Path

    from inference.tokenizer import check_chat_template

    if value is None:
        return None
    try:
        is_file = Path(value).is_file()
    except (OSError, ValueError):  # a template's text may be too long, or odd, for a file name
        is_file = False
    if is_file:
        text = Path(value).read_text()
    elif "{%" in value or "{{" in value:
        text = value
    else:
        raise ValueError(f"--chat-template {value!r} is neither a file nor a template's text")
    try:
        check_chat_template(text)
    except ValueError as e:
        raise ValueError(f"--chat-template {value if is_file else '(the text given)'}: {e}") from None
    return text


def read_verify_rate(args: argparse.Namespace) -> float:
    """--verify-rate, or by default: checked in an open swarm (strangers may join), not else."""
    if args.verify_rate is not None:
        return args.verify_rate
    if args.host not in LOOPBACK and read_swarm_key(args) is None:
        return OPEN_SWARM_VERIFY_RATE
    return 0.0
