import pytest

from vmkit.errors import InvalidValue, exit_code_for
from vmkit.model.names import validate_name
from vmkit.model.sizes import format_size, parse_size


@pytest.mark.parametrize("name", ["web", "a", "web-01", "0x", "a" * 63, "9lives"])
def test_dns_labels_are_accepted(name: str) -> None:
    assert validate_name(name) == name


@pytest.mark.parametrize("name", [
    "../x", "a,b", "a b", "$(id)", "a" * 64, "", "-web", "web-", "Web", "we_b", "we.b", "a/b",
    "web\n", "é",
])
def test_non_labels_are_refused_with_exit_code_2(name: str) -> None:
    with pytest.raises(InvalidValue) as info:
        validate_name(name)
    assert repr(name) in str(info.value)
    assert exit_code_for(info.value) == 2


def test_too_long_says_so() -> None:
    with pytest.raises(InvalidValue, match="63 characters"):
        validate_name("a" * 64)


@pytest.mark.parametrize(("text", "expected"), [
    ("512M", 512 << 20), ("2G", 2 << 30), ("1.5G", 3 << 29), ("2GiB", 2 << 30), ("1024k", 1 << 20),
    ("1T", 1 << 40), ("  64 MB ", 64 << 20), ("4096", 4096), (3, 3),
])
def test_sizes_parse_in_binary_units(text: str | int, expected: int) -> None:
    assert parse_size(text) == expected


def test_default_unit_applies_to_bare_numbers() -> None:
    assert parse_size("512", default_unit="M") == 512 << 20
    assert parse_size(2, default_unit="G") == 2 << 30


@pytest.mark.parametrize("text", ["0", "-1", "-5G", "0M", "abc", "12X", "", "1.2.3G", "G"])
def test_bad_sizes_are_refused(text: str) -> None:
    with pytest.raises(InvalidValue) as info:
        parse_size(text, field="memory")
    assert "memory" in str(info.value)


def test_format_size_round_trips() -> None:
    for value in (512 << 20, 2 << 30, 3 << 29, 1 << 40, 4096):
        assert parse_size(format_size(value)) == value
    assert format_size(100) == "100B"
