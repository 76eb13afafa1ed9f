from vmkit.qemu.accel import TCG_ISOLATION_NOTE, KvmFacts, decide
from vmkit.qemu.hostinfo import parse_machine_help

GOOD = KvmFacts(dev_kvm=True, dev_kvm_usable=True, pvm_module=False, cpu_virt_flags=True)


def test_pvm_backed_kvm_falls_back_to_tcg() -> None:
    facts = GOOD.model_copy(update={"pvm_module": True, "cpu_virt_flags": False})
    decision = decide(facts, None)
    assert decision.accel == "tcg"
    assert "PVM" in decision.reason
    assert decision.isolation_note == TCG_ISOLATION_NOTE


def test_missing_dev_kvm_falls_back_to_tcg() -> None:
    decision = decide(GOOD.model_copy(update={"dev_kvm": False, "dev_kvm_usable": False}), None)
    assert decision.accel == "tcg" and "/dev/kvm does not exist" in decision.reason


def test_kvm_only_after_a_successful_probe() -> None:
    assert decide(GOOD, None).accel == "tcg"
    assert decide(GOOD, False, "hung").accel == "tcg"
    ok = decide(GOOD, True, "booted in 0.3s")
    assert ok.accel == "kvm" and ok.isolation_note is None


def test_machine_help_parsing() -> None:
    text = (
        "Supported machines are:\n"
        "microvm              microvm (i386)\n"
        "pc                   Standard PC (i440FX + PIIX, 1996) (alias of pc-i440fx-10.0)\n"
        "pc-i440fx-10.0       Standard PC (i440FX + PIIX, 1996) (default)\n"
        "q35                  Standard PC (Q35 + ICH9, 2009) (alias of pc-q35-10.0)\n"
        "pc-q35-10.0          Standard PC (Q35 + ICH9, 2009)\n"
    )
    aliases = parse_machine_help(text)
    assert aliases["q35"] == "pc-q35-10.0"
    assert aliases["pc"] == "pc-i440fx-10.0"
    assert aliases["microvm"] == "microvm"
    assert "Supported" not in aliases
