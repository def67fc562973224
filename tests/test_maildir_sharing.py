"""Another program (an IMAP server, an MTA) working on the same Maildir during a session."""

from __future__ import annotations

from support.server import message


def _rename_with_flags(user, flags: str = "S") -> None:
    for path in (user.maildir / "cur").iterdir():
        base = path.name.split(":", 1)[0]
        path.rename(path.with_name(f"{base}:2,{flags}"))


def test_retr_and_dele_follow_a_flag_rename(server):
    body = message("renamed", "kept intact\r\n")
    user = server.add_user([body, message("other")])
    p = user.login()
    try:
        _rename_with_flags(user)  # as an IMAP server marking messages \\Seen would
        assert b"\r\n".join(p.retr(1)[1]) + b"\r\n" == body
        p.dele(1)
    finally:
        p.quit()
    names = [f.name for f in user.files()]
    assert len(names) == 1 and names[0].endswith(":2,S")
    assert user.contents() == [message("other")]


def test_message_removed_by_another_program_between_login_and_dele(server):
    user = server.add_user([message("a"), message("b")])
    p = user.login()
    files = sorted((user.maildir / "cur").iterdir())
    files[0].unlink()
    p.dele(1)
    p.dele(2)
    assert p.quit().startswith(b"+OK")
    assert user.files() == []


def test_delivery_during_session_appears_at_next_login(server):
    user = server.add_user([message("first")])
    p = user.login()
    user.deliver(message("second"))
    assert p.stat()[0] == 1
    p.quit()
    p = user.login()
    assert p.stat()[0] == 2
    p.quit()
