"""Tests of ctxsync.config: parsing, validation, env overrides, round trips and file I/O."""

from __future__ import annotations

import dataclasses
import os
import stat
import tomllib
from pathlib import Path

import pytest

from ctxsync import config
from ctxsync.alerts import DEFAULT_RULES, AlertRule
from ctxsync.config import (
    CONFIG_FILE,
    PEERS_FILE,
    ApiConfig,
    ContextsConfig,
    DiscoveryConfig,
    LogConfig,
    NodeConfig,
    PairingConfig,
    PeerConfig,
    StoreConfig,
    SyncConfig,
    WebhooksConfig,
    dump_node,
    dump_peers,
    format_hostport,
    load,
    parse,
    parse_hostport,
    parse_peers,
    write_atomic,
)
from ctxsync.errors import ConfigError
from ctxsync.types import NodeId

PEERS_DIR = Path(__file__).resolve().parent.parent / "peers"

MINIMAL = """\
[node]
name = "alice"
listen = "127.0.0.1:47101"
api = "127.0.0.1:47201"
"""

CERT = """\
-----BEGIN CERTIFICATE-----
MIIBfake
-----END CERTIFICATE-----
"""


def with_section(section: str, body: str) -> str:
    return f"{MINIMAL}\n[{section}]\n{body}\n"


def make_peer(node_id: str = "AAAAAAA-BBBBBBB", **kwargs: object) -> PeerConfig:
    fields: dict[str, object] = {"name": "bob", "cert_pem": CERT, **kwargs}
    return PeerConfig(node_id=NodeId(node_id), **fields)  # type: ignore[arg-type]


# -- defaults -------------------------------------------------------------------------------


def test_defaults() -> None:
    """Leaves every optional key at its documented default."""
    cfg = parse(MINIMAL)
    assert cfg == NodeConfig(name="alice", listen=("127.0.0.1", 47101), api=("127.0.0.1", 47201))
    assert cfg.sync == SyncConfig(
        ping_interval_s=5.0,
        ping_timeout_s=10.0,
        max_frame_bytes=1048576,
        max_value_bytes=262144,
        max_message_bytes=268435456,
        send_queue_bytes=16_777_216,
        reconnect_min_s=0.5,
        reconnect_max_s=30.0,
    )
    assert cfg.store == StoreConfig(compact_threshold=2000, key_file="", key_env="")
    assert cfg.api_settings == ApiConfig(allow_remote=False)
    assert cfg.discovery == DiscoveryConfig(enabled=True)
    assert cfg.log == LogConfig(level="info", stats_interval_s=10.0)
    assert cfg.peers == ()


def test_dataclasses_are_frozen_and_slotted() -> None:
    """Refuses attribute assignment and has no instance dict."""
    cfg = parse(MINIMAL)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.name = "bob"  # type: ignore[misc]
    for obj in (cfg, cfg.sync, cfg.store, cfg.log, make_peer()):
        assert not hasattr(obj, "__dict__")


def test_watchdog_and_idle_compaction_can_be_turned_off() -> None:
    """0 turns the loop watchdog, its tracebacks and idle compaction off; the edges of the ranges are accepted."""
    cfg = parse(with_section("log", "loop_stall_s = 0\nloop_stall_traceback_s = 0"))
    assert (cfg.log.loop_stall_s, cfg.log.loop_stall_traceback_s) == (0.0, 0.0)
    cfg = parse(with_section("log", "loop_stall_s = 0.1\nloop_stall_traceback_s = 1"))
    assert (cfg.log.loop_stall_s, cfg.log.loop_stall_traceback_s) == (0.1, 1.0)
    cfg = parse(with_section("log", "loop_stall_s = 3600\nloop_stall_traceback_s = 86400"))
    assert (cfg.log.loop_stall_s, cfg.log.loop_stall_traceback_s) == (3600.0, 86400.0)
    assert parse(with_section("store", "idle_compact_s = 0")).store.idle_compact_s == 0.0
    assert parse(with_section("store", "unload_idle_s = 0")).store.unload_idle_s == 0.0


def test_pairing_port_must_not_be_the_sync_or_api_port() -> None:
    """[pairing] port defaults to 0 (any), and may not take node.listen's or node.api's port."""
    assert parse(MINIMAL).pairing.port == 0
    listen_port = parse(MINIMAL).listen[1]
    with pytest.raises(ConfigError) as exc_info:
        parse(with_section("pairing", f"port = {listen_port}"))
    assert exc_info.value.key == "pairing.port"


def test_integers_accepted_for_seconds() -> None:
    """Reads an integer given for a seconds key as a float."""
    cfg = parse(with_section("log", "stats_interval_s = 5"))
    assert cfg.log.stats_interval_s == 5.0
    assert isinstance(cfg.log.stats_interval_s, float)


# -- round trip -----------------------------------------------------------------------------


NON_DEFAULT = NodeConfig(
    name="Ålice's laptop",
    listen=("::", 0),
    api=("::1", 47999),
    sync=SyncConfig(
        ping_interval_s=1.25,
        ping_timeout_s=3.5,
        max_frame_bytes=65536,
        max_value_bytes=32767,
        max_message_bytes=65536,
        send_queue_bytes=65_536,
        reconnect_min_s=0.1,
        reconnect_max_s=0.1,
    ),
    store=StoreConfig(compact_threshold=10, key_env="MY_STORE_KEY"),
    log=LogConfig(level="debug", stats_interval_s=0.001),
    api_settings=ApiConfig(allow_remote=True),
    discovery=DiscoveryConfig(enabled=False),
    pairing=PairingConfig(port=47998),
    contexts=ContextsConfig(history_limit=7, snapshot_every=0, snapshot_keep=3),
    webhooks=WebhooksConfig(max_attempts=2, backoff_s=0.25, max_backoff_s=0.5, timeout_s=1.5, batch_max=9),
    alerts=(
        AlertRule("replication_lag", "replication_lag_ms", 5000.0, 30.0, "warning"),
        AlertRule("rtt_p99", "rtt_p99_ms", 250.0, 30.0, "critical"),
        AlertRule("peer_out_of_sync", "peer_out_of_sync_s", 60.0, 0.0, "warning"),
        AlertRule("idle_cpu", "cpu_percent", 90.0, 120.0, "info"),
    ),
)


@pytest.mark.parametrize("cfg", [parse(MINIMAL), NON_DEFAULT], ids=["defaults", "non-default"])
def test_round_trip(cfg: NodeConfig) -> None:
    """Parses what dump_node writes back to an equal config."""
    assert parse(dump_node(cfg)) == cfg


def test_round_trip_every_key() -> None:
    """Writes every key of every section, each of which reads back unchanged."""
    text = dump_node(NON_DEFAULT)
    doc = tomllib.loads(text)
    assert set(doc) == {"node", "sync", "store", "log", "api", "discovery", "pairing", "contexts", "webhooks", "alert"}
    assert [a["name"] for a in doc["alert"]] == [r.name for r in NON_DEFAULT.alerts] + ["rss"]
    assert set(doc["node"]) == {"name", "listen", "api"}
    for section, attr in (("sync", "sync"), ("store", "store"), ("log", "log"), ("api", "api_settings"), ("discovery", "discovery"), ("pairing", "pairing")):
        value = getattr(NON_DEFAULT, attr)
        assert set(doc[section]) == {f.name for f in dataclasses.fields(value)}
        assert doc[section] == dataclasses.asdict(value)
    assert doc["node"]["api"] == "[::1]:47999"


def test_dump_node_leaves_out_peers() -> None:
    """Keeps peers out of config.toml."""
    cfg = dataclasses.replace(parse(MINIMAL), peers=(make_peer(),))
    assert parse(dump_node(cfg)) == dataclasses.replace(cfg, peers=())


# -- the demo files in peers/ ---------------------------------------------------------------


DEMO_FILES = sorted(PEERS_DIR.glob("*.toml"))


def test_demo_files_exist() -> None:
    """Ships alice, bob and carol."""
    assert [p.name for p in DEMO_FILES] == ["alice.toml", "bob.toml", "carol.toml"]


@pytest.mark.parametrize("path", DEMO_FILES, ids=lambda p: p.name)
def test_demo_file_loads(path: Path) -> None:
    """Parses every file in peers/ as a config.toml named after its file."""
    cfg = parse(path.read_text(encoding="utf-8"), path=str(path))
    assert cfg.name == path.stem
    assert cfg.listen[0] == cfg.api[0] == "127.0.0.1"
    assert cfg.log.stats_interval_s == 5.0


def test_demo_files_have_distinct_ports() -> None:
    """Gives the three demo nodes six distinct, fixed ports."""
    cfgs = [parse(p.read_text(encoding="utf-8")) for p in DEMO_FILES]
    ports = [port for cfg in cfgs for (_, port) in (cfg.listen, cfg.api)]
    assert len(set(ports)) == len(ports) == 6
    assert 0 not in ports
    assert {cfg.name: (cfg.listen[1], cfg.api[1]) for cfg in cfgs} == {
        "alice": (47101, 47201),
        "bob": (47102, 47202),
        "carol": (47103, 47203),
    }


# -- unknown and missing keys ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "key"),
    [
        (with_section("sync", "ping_intervl_s = 1.0"), "sync.ping_intervl_s"),
        (with_section("store", "compact = 10"), "store.compact"),
        (with_section("log", "lvl = 'info'"), "log.lvl"),
        (MINIMAL + "port = 1\n", "node.port"),
        (MINIMAL + "\n[synk]\n", "synk"),
        ("top = 1\n" + MINIMAL, "top"),
        (with_section("sync.extra", "a = 1"), "sync.extra"),
    ],
)
def test_unknown_key_rejected(text: str, key: str) -> None:
    """Rejects an unknown section or key, naming the file and the dotted key."""
    with pytest.raises(ConfigError) as exc_info:
        parse(text, path="/home/x/config.toml")
    assert exc_info.value.key == key
    assert exc_info.value.path == "/home/x/config.toml"
    assert str(exc_info.value).startswith(f"/home/x/config.toml: {key}: unknown ")


def test_unknown_key_suggests_close_match() -> None:
    """Suggests the key that was probably meant."""
    with pytest.raises(ConfigError, match="did you mean 'ping_interval_s'"):
        parse(with_section("sync", "ping_intervl_s = 1.0"))


@pytest.mark.parametrize("key", ["name", "listen", "api"])
def test_missing_required_key(key: str) -> None:
    """Rejects a [node] section without name, listen or api."""
    text = "\n".join(line for line in MINIMAL.splitlines() if not line.startswith(key))
    with pytest.raises(ConfigError, match="missing required key") as exc_info:
        parse(text)
    assert exc_info.value.key == f"node.{key}"


def test_missing_node_section() -> None:
    """Rejects a file without [node]."""
    with pytest.raises(ConfigError, match=r"missing section \[node\]"):
        parse("[log]\nlevel = 'info'\n")


def test_malformed_toml() -> None:
    """Reports a TOML syntax error with the file's path."""
    with pytest.raises(ConfigError, match=r"^cfg\.toml: invalid TOML"):
        parse("[node\n", path="cfg.toml")


# -- wrong types and ranges -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("section", "body", "key"),
    [
        ("sync", "ping_interval_s = '5'", "sync.ping_interval_s"),
        ("sync", "ping_interval_s = true", "sync.ping_interval_s"),
        ("sync", "max_frame_bytes = 1048576.0", "sync.max_frame_bytes"),
        ("sync", "send_queue_bytes = [1]", "sync.send_queue_bytes"),
        ("store", "compact_threshold = '2000'", "store.compact_threshold"),
        ("log", "level = 1", "log.level"),
        ("log", "stats_interval_s = 1979-05-27", "log.stats_interval_s"),
    ],
)
def test_wrong_type_rejected(section: str, body: str, key: str) -> None:
    """Rejects a value of the wrong TOML type."""
    with pytest.raises(ConfigError, match="expected") as exc_info:
        parse(with_section(section, body), path="c.toml")
    assert exc_info.value.key == key
    assert exc_info.value.path == "c.toml"


@pytest.mark.parametrize(
    ("section", "body", "key"),
    [
        ("sync", "ping_interval_s = 0", "sync.ping_interval_s"),
        ("sync", "ping_interval_s = inf", "sync.ping_interval_s"),
        ("sync", "ping_interval_s = nan", "sync.ping_interval_s"),
        ("sync", "ping_timeout_s = -1.0", "sync.ping_timeout_s"),
        ("sync", "max_frame_bytes = 65535", "sync.max_frame_bytes"),
        ("sync", "max_value_bytes = 0", "sync.max_value_bytes"),
        ("sync", "max_value_bytes = 524288", "sync.max_value_bytes"),
        ("sync", "max_message_bytes = 1048575", "sync.max_message_bytes"),
        ("sync", "send_queue_bytes = 65535", "sync.send_queue_bytes"),
        ("sync", "reconnect_min_s = 0", "sync.reconnect_min_s"),
        ("sync", "reconnect_max_s = 0.25", "sync.reconnect_max_s"),
        ("store", "compact_threshold = 9", "store.compact_threshold"),
        ("log", "level = 'verbose'", "log.level"),
        ("log", "stats_interval_s = 0", "log.stats_interval_s"),
        ("log", "loop_stall_s = -1", "log.loop_stall_s"),
        ("log", "loop_stall_s = 0.001", "log.loop_stall_s"),
        ("log", "loop_stall_s = 1e10", "log.loop_stall_s"),
        ("log", "loop_stall_s = nan", "log.loop_stall_s"),
        ("log", "loop_stall_traceback_s = 0.5", "log.loop_stall_traceback_s"),
        ("log", "loop_stall_s = 10\nloop_stall_traceback_s = 5", "log.loop_stall_traceback_s"),
        ("log", "loop_stall_traceback_s = 1e10", "log.loop_stall_traceback_s"),
        ("store", "idle_compact_s = -1", "store.idle_compact_s"),
        ("store", "idle_compact_s = inf", "store.idle_compact_s"),
        ("store", "idle_compact_s = 0.5", "store.idle_compact_s"),
        ("store", "unload_idle_s = -1", "store.unload_idle_s"),
        ("store", "unload_idle_s = 0.5", "store.unload_idle_s"),
        ("pairing", "port = -1", "pairing.port"),
        ("pairing", "port = 65536", "pairing.port"),
        ("pairing", "port = true", "pairing.port"),
    ],
)
def test_out_of_range_rejected(section: str, body: str, key: str) -> None:
    """Rejects a value out of its documented range, naming file and key."""
    with pytest.raises(ConfigError) as exc_info:
        parse(with_section(section, body), path="c.toml")
    assert exc_info.value.key == key
    assert str(exc_info.value).startswith(f"c.toml: {key}: ")


def test_range_edges_accepted() -> None:
    """Accepts the smallest values in range."""
    cfg = parse(
        with_section(
            "sync",
            "max_frame_bytes = 65536\nmax_value_bytes = 32767\nmax_message_bytes = 65536\n"
            "send_queue_bytes = 65536\nreconnect_min_s = 2.0\nreconnect_max_s = 2.0",
        )
    )
    assert cfg.sync.max_value_bytes == 32767
    assert cfg.sync.send_queue_bytes == 65536


def test_log_level_any_case() -> None:
    """Reads a log level in any case and stores it lower case."""
    assert parse(with_section("log", "level = 'WARNING'")).log.level == "warning"


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ('""', "1..64 characters"),
        ('"' + "x" * 65 + '"', "1..64 characters"),
        ('" alice"', "white space"),
        ('"ali\\u0007ce"', "control characters"),
        ("42", "expected a string"),
    ],
)
def test_bad_node_name(name: str, reason: str) -> None:
    """Rejects an empty, overlong, padded, control-character or non-string name."""
    text = MINIMAL.replace('"alice"', name)
    with pytest.raises(ConfigError, match=reason) as exc_info:
        parse(text)
    assert exc_info.value.key == "node.name"


def test_name_of_64_characters_accepted() -> None:
    """Accepts a name of exactly 64 characters."""
    assert parse(MINIMAL.replace("alice", "é" * 64)).name == "é" * 64


@pytest.mark.parametrize("key", ["listen", "api"])
def test_bad_address_rejected(key: str) -> None:
    """Rejects a node address that is not HOST:PORT, naming the key."""
    text = MINIMAL.replace(f'{key} = "127.0.0.1', f'{key} = "127.0.0.1:x')
    with pytest.raises(ConfigError) as exc_info:
        parse(text, path="c.toml")
    assert exc_info.value.key == f"node.{key}"
    assert exc_info.value.path == "c.toml"


def test_listen_and_api_must_differ() -> None:
    """Rejects the same address for listener and API, except port 0."""
    with pytest.raises(ConfigError, match="must differ") as exc_info:
        parse(MINIMAL.replace("47201", "47101"))
    assert exc_info.value.key == "node.api"
    zero = MINIMAL.replace("47201", "0").replace("47101", "0")
    assert parse(zero).listen == parse(zero).api == ("127.0.0.1", 0)


def test_constructors_validate() -> None:
    """Refuses to build an invalid config directly, too."""
    with pytest.raises(ConfigError) as exc_info:
        SyncConfig(max_frame_bytes=1000)
    assert exc_info.value.key == "sync.max_frame_bytes"
    with pytest.raises(ConfigError):
        NodeConfig(name="", listen=("127.0.0.1", 1), api=("127.0.0.1", 2))
    with pytest.raises(ConfigError):
        NodeConfig(name="a", listen=("127.0.0.1", 70000), api=("127.0.0.1", 2))
    with pytest.raises(ConfigError):
        NodeConfig(name="a", listen=("bad host", 1), api=("127.0.0.1", 2))
    with pytest.raises(ConfigError):
        LogConfig(level="loud")  # type: ignore[arg-type]


# -- environment overrides ------------------------------------------------------------------


def test_env_overrides() -> None:
    """Applies every CTXSYNC_* override over the file's values."""
    env = {
        "CTXSYNC_LISTEN": "0.0.0.0:48000",
        "CTXSYNC_API": "[::1]:48001",
        "CTXSYNC_LOG_LEVEL": "DEBUG",
        "CTXSYNC_STATS_INTERVAL_S": "2.5",
    }
    cfg = parse(with_section("log", "level = 'error'\nstats_interval_s = 60"), env)
    assert cfg.listen == ("0.0.0.0", 48000)
    assert cfg.api == ("::1", 48001)
    assert cfg.log == LogConfig(level="debug", stats_interval_s=2.5)


def test_env_ignored_when_empty_or_unrelated() -> None:
    """Treats an empty variable as unset and ignores other variables."""
    env = {"CTXSYNC_LISTEN": "", "CTXSYNC_HOME": "/x", "CTXSYNC_OTHER": "y", "PATH": "/bin"}
    assert parse(MINIMAL, env) == parse(MINIMAL)
    assert parse(MINIMAL, None) == parse(MINIMAL)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("CTXSYNC_LISTEN", "127.0.0.1"),
        ("CTXSYNC_LISTEN", "::1:47101"),
        ("CTXSYNC_API", "localhost:99999"),
        ("CTXSYNC_LOG_LEVEL", "loud"),
        ("CTXSYNC_STATS_INTERVAL_S", "soon"),
        ("CTXSYNC_STATS_INTERVAL_S", "0"),
        ("CTXSYNC_STATS_INTERVAL_S", "-1"),
        ("CTXSYNC_STATS_INTERVAL_S", "inf"),
        ("CTXSYNC_STATS_INTERVAL_S", "nan"),
    ],
)
def test_bad_env_value_names_variable(variable: str, value: str) -> None:
    """Rejects a bad override with an error naming the variable."""
    with pytest.raises(ConfigError) as exc_info:
        parse(MINIMAL, {variable: value}, path="c.toml")
    assert exc_info.value.key == variable
    assert str(exc_info.value).startswith(f"{variable}: ")


def test_env_override_conflict_says_where() -> None:
    """Mentions the override when it makes listen and api collide."""
    with pytest.raises(ConfigError, match="after CTXSYNC_LISTEN"):
        parse(MINIMAL, {"CTXSYNC_LISTEN": "127.0.0.1:47201"})


# -- HOST:PORT ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:47101", ("127.0.0.1", 47101)),
        ("localhost:0", ("localhost", 0)),
        ("my-host.lan:65535", ("my-host.lan", 65535)),
        ("h:1", ("h", 1)),
        ("[::1]:47101", ("::1", 47101)),
        ("[::]:80", ("::", 80)),
        ("[2001:db8::1]:443", ("2001:db8::1", 443)),
        ("[fe80::1%eth0]:47101", ("fe80::1%eth0", 47101)),
        ("[::ffff:127.0.0.1]:8", ("::ffff:127.0.0.1", 8)),
    ],
)
def test_parse_hostport(text: str, expected: tuple[str, int]) -> None:
    """Parses host names, IPv4 and bracketed IPv6 addresses, and formats them back."""
    assert parse_hostport(text) == expected
    assert format_hostport(*expected) == text


@pytest.mark.parametrize(
    "text",
    [
        "",
        "127.0.0.1",
        ":47101",
        "127.0.0.1:",
        "127.0.0.1:65536",
        "127.0.0.1:-1",
        "127.0.0.1:+80",
        "127.0.0.1: 80",
        "127.0.0.1:4_7",
        "127.0.0.1:١٢",
        "127.0.0.1:123456",
        "::1:47101",
        "[::1]47101",
        "[::1:47101",
        "[]:80",
        "[127.0.0.1]:80",
        "[nothex::1]:80",
        "256.1.1.1:80",
        "1.2.3:80",
        "bad host:80",
        "host/x:80",
        "-host:80",
        "http://h:80",
    ],
)
def test_parse_hostport_errors(text: str) -> None:
    """Rejects anything but HOST:PORT, naming key and path."""
    with pytest.raises(ConfigError, match="expected HOST:PORT") as exc_info:
        parse_hostport(text, key="node.listen", path="c.toml")
    assert exc_info.value.key == "node.listen"
    assert exc_info.value.path == "c.toml"


def test_parse_hostport_without_key() -> None:
    """Reports no key when none is given."""
    with pytest.raises(ConfigError) as exc_info:
        parse_hostport("nope")
    assert exc_info.value.key is None


# -- peers.toml -----------------------------------------------------------------------------


PEERS = (
    make_peer("AAAAAAA-BBBBBBB", name="bob", addr=("127.0.0.1", 47102)),
    make_peer(
        "CCCCCCC-DDDDDDD", name="carol", addr=("::1", 47103), contexts=("notes", "todo"), read_only=True
    ),
    make_peer("EEEEEEE-FFFFFFF", name="dave", contexts=()),
)


def test_peers_round_trip() -> None:
    """Parses what dump_peers writes back to equal peers, certificates intact."""
    text = dump_peers(PEERS)
    assert parse_peers(text) == PEERS
    assert parse_peers(text)[0].cert_pem == CERT
    assert '"""\n-----BEGIN CERTIFICATE-----' in text


def test_peers_empty() -> None:
    """Reads an empty file as no peers and writes no peers as an empty file."""
    assert parse_peers("") == ()
    assert dump_peers([]) == ""


def test_peers_defaults() -> None:
    """Shares every context, read-write, with no address, unless told otherwise."""
    text = f'[[peer]]\nnode_id = "X"\nname = "bob"\ncert = """\n{CERT}"""\n'
    (peer,) = parse_peers(text)
    assert peer == PeerConfig(node_id=NodeId("X"), name="bob", cert_pem=CERT)
    assert peer.addr is None and peer.contexts == ("*",) and peer.read_only is False


def test_peers_duplicate_node_id_rejected() -> None:
    """Rejects two peers with the same node id, in the file and in NodeConfig."""
    text = dump_peers(PEERS[:1]) + dump_peers(PEERS[:1])
    with pytest.raises(ConfigError, match="duplicate peer") as exc_info:
        parse_peers(text, path="peers.toml")
    assert exc_info.value.key == "peer[1].node_id"
    assert exc_info.value.path == "peers.toml"
    with pytest.raises(ConfigError, match="duplicate peer"):
        dataclasses.replace(parse(MINIMAL), peers=(PEERS[0], PEERS[0]))
    with pytest.raises(ConfigError, match="duplicate peer"):
        dump_peers([PEERS[0], PEERS[0]])


@pytest.mark.parametrize(
    ("line", "key"),
    [
        ('nmae = "x"', "peer[0].nmae"),
        ("node_id = 7", "peer[0].node_id"),
        ('node_id = ""', "peer[0].node_id"),
        ('name = ""', "peer[0].name"),
        ('addr = "nowhere"', "peer[0].addr"),
        ('contexts = "*"', "peer[0].contexts"),
        ("contexts = [1]", "peer[0].contexts[0]"),
        ('contexts = [""]', "peer[0].contexts"),
        ('read_only = "no"', "peer[0].read_only"),
        ('cert = ""', "peer[0].cert"),
    ],
)
def test_peers_bad_values_rejected(line: str, key: str) -> None:
    """Rejects a bad or unknown peer key, naming it as peer[INDEX].KEY."""
    base = {"node_id": '"X"', "name": '"bob"', "cert": '"pem"'}
    field = line.split(" = ")[0]
    base.pop(field, None)
    text = "[[peer]]\n" + "".join(f"{k} = {v}\n" for k, v in base.items()) + line + "\n"
    with pytest.raises(ConfigError) as exc_info:
        parse_peers(text, path="peers.toml")
    assert exc_info.value.key == key
    assert exc_info.value.path == "peers.toml"


@pytest.mark.parametrize("key", ["node_id", "name", "cert"])
def test_peers_missing_key_rejected(key: str) -> None:
    """Rejects a peer without node_id, name or cert."""
    fields = {"node_id": '"X"', "name": '"bob"', "cert": '"pem"'}
    del fields[key]
    text = "[[peer]]\n" + "".join(f"{k} = {v}\n" for k, v in fields.items())
    with pytest.raises(ConfigError, match="missing required key") as exc_info:
        parse_peers(text)
    assert exc_info.value.key == f"peer[0].{key}"


@pytest.mark.parametrize(
    ("text", "key"), [("peer = 1", "peer"), ("[peer]\nname = 'x'", "peer"), ("x = 1", "x")]
)
def test_peers_bad_layout_rejected(text: str, key: str) -> None:
    """Rejects anything but an array of [[peer]] tables."""
    with pytest.raises(ConfigError) as exc_info:
        parse_peers(text)
    assert exc_info.value.key == key


def test_shares() -> None:
    """Shares every context with "*", else only the listed ones."""
    assert make_peer(contexts=("*",)).shares("anything")
    assert make_peer(contexts=("notes", "*")).shares("todo")
    listed = make_peer(contexts=("notes", "todo"))
    assert listed.shares("notes") and listed.shares("todo")
    assert not listed.shares("secrets")
    assert not make_peer(contexts=()).shares("notes")


def test_node_config_peer_lookup() -> None:
    """Finds a peer by node id, or returns None."""
    cfg = dataclasses.replace(parse(MINIMAL), peers=PEERS)
    assert cfg.peer("CCCCCCC-DDDDDDD") is PEERS[1]
    assert cfg.peer("ZZZZZZZ") is None


# -- load -----------------------------------------------------------------------------------


def test_load_without_peers(tmp_path: Path) -> None:
    """Loads config.toml alone as a node with no peers."""
    (tmp_path / CONFIG_FILE).write_text(MINIMAL, encoding="utf-8")
    cfg = load(tmp_path)
    assert cfg == parse(MINIMAL)
    assert cfg.peers == ()


def test_load_with_peers(tmp_path: Path) -> None:
    """Loads config.toml and peers.toml together."""
    (tmp_path / CONFIG_FILE).write_text(MINIMAL, encoding="utf-8")
    (tmp_path / PEERS_FILE).write_text(dump_peers(PEERS), encoding="utf-8")
    cfg = load(str(tmp_path))
    assert cfg.peers == PEERS
    assert dataclasses.replace(cfg, peers=()) == parse(MINIMAL)


def test_load_applies_env_only_when_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Applies the env mapping it is given and never reads os.environ itself."""
    (tmp_path / CONFIG_FILE).write_text(MINIMAL, encoding="utf-8")
    monkeypatch.setenv("CTXSYNC_LOG_LEVEL", "debug")
    assert load(tmp_path).log.level == "info"
    assert load(tmp_path, os.environ).log.level == "debug"


def test_load_missing_config(tmp_path: Path) -> None:
    """Tells the user to run ctxsync init when config.toml is missing."""
    with pytest.raises(ConfigError, match=r"no config\.toml in .*run `ctxsync init") as exc_info:
        load(tmp_path / "nowhere")
    assert exc_info.value.path == str(tmp_path / "nowhere" / CONFIG_FILE)


def test_load_errors_name_the_file(tmp_path: Path) -> None:
    """Names the offending file when either file is invalid."""
    config_path = tmp_path / CONFIG_FILE
    peers_path = tmp_path / PEERS_FILE
    config_path.write_text(MINIMAL, encoding="utf-8")
    peers_path.write_text("[[peer]]\nname = 'bob'\n", encoding="utf-8")
    with pytest.raises(ConfigError) as exc_info:
        load(tmp_path)
    assert exc_info.value.path == str(peers_path)
    config_path.write_bytes(b"[node]\nname = '\xff'\n")
    with pytest.raises(ConfigError, match="not UTF-8") as exc_info:
        load(tmp_path)
    assert exc_info.value.path == str(config_path)


# -- write_atomic ---------------------------------------------------------------------------


def test_write_atomic_mode_and_no_temp_files(tmp_path: Path) -> None:
    """Writes the text with mode 0600 and leaves no temporary file behind."""
    target = tmp_path / PEERS_FILE
    write_atomic(target, dump_peers(PEERS))
    assert parse_peers(target.read_text(encoding="utf-8")) == PEERS
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert os.listdir(tmp_path) == [PEERS_FILE]


def test_write_atomic_replaces_and_sets_mode(tmp_path: Path) -> None:
    """Replaces an existing file and applies the requested mode regardless of umask."""
    target = tmp_path / CONFIG_FILE
    target.write_text("old", encoding="utf-8")
    target.chmod(0o666)
    write_atomic(str(target), MINIMAL, mode=0o644)
    assert target.read_text(encoding="utf-8") == MINIMAL
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    write_atomic(target, "new")
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert sorted(os.listdir(tmp_path)) == [CONFIG_FILE]


def test_write_atomic_failure_leaves_original(tmp_path: Path) -> None:
    """Keeps the old content and removes the temporary file when the rename fails."""
    target = tmp_path / "dir-in-the-way"
    (target / "child").mkdir(parents=True)
    with pytest.raises(OSError):
        write_atomic(target, "text")
    assert sorted(os.listdir(tmp_path)) == ["dir-in-the-way"]
    assert os.listdir(target) == ["child"]


def test_dump_load_through_files(tmp_path: Path) -> None:
    """Round-trips a full node through write_atomic and load."""
    cfg = dataclasses.replace(NON_DEFAULT, peers=PEERS)
    write_atomic(tmp_path / CONFIG_FILE, dump_node(cfg))
    write_atomic(tmp_path / PEERS_FILE, dump_peers(cfg.peers))
    assert load(tmp_path) == cfg


def test_module_has_no_io_layer_imports() -> None:
    """Imports none of the I/O libraries the pure layer must avoid."""
    source = Path(config.__file__).read_text(encoding="utf-8")
    for name in ("asyncio", "websockets", "sqlite3", "psutil", "structlog"):
        assert f"import {name}" not in source
        assert f"from {name}" not in source


# -- security settings ---------------------------------------------------------------------


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.20", "example.com", "::"])
def test_api_off_loopback_refused_unless_allowed(host: str) -> None:
    """Refuses a non-loopback API address unless [api] allow_remote is set."""
    api = f"[{host}]:47201" if ":" in host else f"{host}:47201"
    text = MINIMAL.replace('api = "127.0.0.1:47201"', f'api = "{api}"')
    with pytest.raises(ConfigError, match="not a loopback address"):
        parse(text)
    assert parse(text + "\n[api]\nallow_remote = true\n").api[0] == host


@pytest.mark.parametrize("host", ["127.0.0.1", "127.8.9.10", "::1", "localhost"])
def test_api_on_loopback_accepted(host: str) -> None:
    """Accepts every loopback form for the API."""
    api = f"[{host}]:47201" if ":" in host else f"{host}:47201"
    assert parse(MINIMAL.replace('api = "127.0.0.1:47201"', f'api = "{api}"')).api[0] == host


@pytest.mark.parametrize(
    ("body", "match"),
    [
        ('key_env = "1BAD"', "environment variable name"),
        ('key_env = "A"\nkey_file = "k"', "not both"),
        ("key_file = 3", "expected a string"),
    ],
)
def test_store_key_settings_checked(body: str, match: str) -> None:
    """Refuses a malformed key source."""
    with pytest.raises(ConfigError, match=match):
        parse(with_section("store", body))


def test_discovery_can_be_turned_off() -> None:
    """Reads [discovery] enabled."""
    assert parse(with_section("discovery", "enabled = false")).discovery.enabled is False
    with pytest.raises(ConfigError, match="discovery.enabled"):
        parse(with_section("discovery", 'enabled = "no"'))


def test_alert_rules_merge_with_defaults() -> None:
    """[[alert]] tables override, disable or add rules; errors name the table."""
    assert parse(MINIMAL).alerts == DEFAULT_RULES
    text = MINIMAL + """
[[alert]]
name = "rss"
threshold = 1073741824

[[alert]]
name = "rtt_p99"
enabled = false

[[alert]]
name = "store"
metric = "store_failing"
threshold = 0
severity = "critical"
"""
    rules = {r.name: r for r in parse(text).alerts}
    assert rules["rss"].threshold == 1073741824 and "rtt_p99" not in rules
    assert rules["store"].metric == "store_failing" and rules["store"].severity == "critical"
    with pytest.raises(ConfigError, match=r"alert\[0\]\.metric"):
        parse(MINIMAL + '[[alert]]\nname = "x"\nmetric = "nope"\nthreshold = 1\n')
