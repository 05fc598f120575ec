"""``meshctl iptables``: the generated nat rules (no iptables is run here)."""

import pytest

from mesh.cli import iptables
from mesh.cli.iptables import CaptureSpec, clean_commands, install_commands
from mesh.cli.main import main


def _rules(spec=CaptureSpec()):
    return [" ".join(command) for command in install_commands(spec)]


def _chain(rules, chain):
    return [rule.split(f"-A {chain} ", 1)[1] for rule in rules if f"-A {chain} " in rule]


def test_chains_are_created_filled_and_hooked_last():
    rules = _rules()
    assert rules[:4] == [f"-t nat -N {chain}" for chain in
                         ("MESH_INBOUND", "MESH_IN_REDIRECT", "MESH_OUTPUT", "MESH_REDIRECT")]
    assert rules[-2:] == ["-t nat -A PREROUTING -p tcp -j MESH_INBOUND", "-t nat -A OUTPUT -p tcp -j MESH_OUTPUT"]
    assert all(rule.startswith("-t nat ") for rule in rules)


def test_outbound_redirects_tcp_to_15001_except_proxy_uid_loopback():
    rules = _rules()
    assert _chain(rules, "MESH_REDIRECT") == ["-p tcp -j REDIRECT --to-ports 15001"]
    assert _chain(rules, "MESH_OUTPUT") == [
        "-m owner --uid-owner 1337 -j RETURN",
        "-o lo -j RETURN",
        "-d 127.0.0.0/8 -j RETURN",
        "-p tcp -j MESH_REDIRECT",
    ]


def test_inbound_redirects_tcp_to_15006_except_the_proxy_ports():
    rules = _rules()
    assert _chain(rules, "MESH_IN_REDIRECT") == ["-p tcp -j REDIRECT --to-ports 15006"]
    inbound = _chain(rules, "MESH_INBOUND")
    assert inbound[-1] == "-p tcp -j MESH_IN_REDIRECT"
    returned = [int(rule.split("--dport ")[1].split()[0]) for rule in inbound[:-1]]
    assert returned == [15000, 15001, 15006, 15012, 15014, 15020, 15021, 15090]


def test_exclusions_and_custom_ports():
    spec = CaptureSpec(proxy_uid=999, proxy_gid=998, outbound_port=16001, inbound_port=16006,
                       exclude_outbound_ports=(22, 3306, 22), exclude_inbound_ports=(8081, 15021),
                       exclude_outbound_ip_ranges=("169.254.169.254/32", "10.0.0.0/8"))
    rules = _rules(spec)
    assert _chain(rules, "MESH_REDIRECT") == ["-p tcp -j REDIRECT --to-ports 16001"]
    assert _chain(rules, "MESH_IN_REDIRECT") == ["-p tcp -j REDIRECT --to-ports 16006"]
    assert _chain(rules, "MESH_OUTPUT") == [
        "-m owner --uid-owner 999 -j RETURN",
        "-m owner --gid-owner 998 -j RETURN",
        "-o lo -j RETURN",
        "-d 127.0.0.0/8 -j RETURN",
        "-p tcp --dport 22 -j RETURN",
        "-p tcp --dport 3306 -j RETURN",
        "-d 169.254.169.254/32 -j RETURN",
        "-d 10.0.0.0/8 -j RETURN",
        "-p tcp -j MESH_REDIRECT",
    ]
    inbound = _chain(rules, "MESH_INBOUND")
    ports = [int(rule.split("--dport ")[1].split()[0]) for rule in inbound[:-1]]
    assert ports == [15000, 15001, 15006, 15012, 15014, 15020, 15021, 15090, 16001, 16006, 8081]


def test_outbound_only():
    rules = _rules(CaptureSpec(inbound=False))
    assert "-t nat -A PREROUTING -p tcp -j MESH_INBOUND" not in rules
    assert rules[-1] == "-t nat -A OUTPUT -p tcp -j MESH_OUTPUT"


def test_clean_unhooks_then_flushes_then_deletes():
    rules = [" ".join(command) for command in clean_commands()]
    assert rules[:2] == ["-t nat -D PREROUTING -p tcp -j MESH_INBOUND", "-t nat -D OUTPUT -p tcp -j MESH_OUTPUT"]
    chains = ("MESH_INBOUND", "MESH_IN_REDIRECT", "MESH_OUTPUT", "MESH_REDIRECT")
    assert rules[2:] == [f"-t nat -F {c}" for c in chains] + [f"-t nat -X {c}" for c in chains]


def test_every_install_rule_has_its_clean_counterpart():
    """Whatever install adds, clean removes: jumps by -D, everything else by flushing our chains."""
    cleaned = {" ".join(command) for command in clean_commands()}
    for command in install_commands(CaptureSpec(exclude_outbound_ports=(1,))):
        rule = " ".join(command)
        if command[2] == "-N":
            assert f"-t nat -X {command[3]}" in cleaned
        elif command[3].startswith("MESH_"):
            assert f"-t nat -F {command[3]}" in cleaned
        else:
            assert rule.replace(" -A ", " -D ") in cleaned


def test_dry_run_prints_the_commands(capsys):
    assert main(["iptables", "--dry-run", "--proxy-uid", "4242", "--exclude-outbound-ports", "22,53",
                 "--exclude-outbound-ip-ranges", "169.254.169.254"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "iptables -w -t nat -N MESH_INBOUND"
    assert "iptables -w -t nat -A MESH_OUTPUT -m owner --uid-owner 4242 -j RETURN" in lines
    assert "iptables -w -t nat -A MESH_OUTPUT -p tcp --dport 53 -j RETURN" in lines
    assert "iptables -w -t nat -A MESH_OUTPUT -d 169.254.169.254/32 -j RETURN" in lines
    assert main(["iptables", "--clean", "--dry-run"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "iptables -w -t nat -D PREROUTING -p tcp -j MESH_INBOUND"


@pytest.mark.parametrize("argv, message", [
    (["--exclude-outbound-ports", "22,http"], "'http' is not a port"),
    (["--inbound-port", "70000"], "'70000' is not a port"),
    (["--exclude-outbound-ip-ranges", "10.0.0/33"], "is not an IP range"),
    (["--exclude-outbound-ip-ranges", "fd00::/8"], "only IPv4"),
    (["--proxy-uid", "no-such-user-here"], "no user 'no-such-user-here'"),
])
def test_bad_options_are_explained(capsys, argv, message):
    assert main(["iptables", "--dry-run", *argv]) == 2
    assert message in capsys.readouterr().err


def test_a_failing_install_rolls_back(monkeypatch):
    ran = []

    def fake_run(program, args, check=True):
        ran.append(" ".join(args))
        if check and "MESH_REDIRECT" in args and "REDIRECT" in args and "-A" in args:
            raise iptables.IptablesError("boom")
        return "-D" not in args

    monkeypatch.setattr(iptables, "_run", fake_run)
    with pytest.raises(iptables.IptablesError):
        iptables.install(CaptureSpec())
    assert ran[-1] == "-t nat -X MESH_REDIRECT"  # cleaned up after the failure
    assert not any("PREROUTING" in rule and "-A" in rule for rule in ran)
