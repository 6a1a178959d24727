"""docs/troubleshooting.md lists every error message hift's code can raise."""

from pathlib import Path

from hift_cli.reference import error_messages

DOC = (Path(__file__).parents[1] / "docs" / "troubleshooting.md").read_text()


def test_every_error_message_is_documented():
    messages = error_messages()
    assert len(messages) > 40  # the extraction found them
    missing = [f"{module}: {text}" for module, text in messages if f"`{text}`" not in DOC]
    assert not missing, "add to docs/troubleshooting.md:\n" + "\n".join(missing)
