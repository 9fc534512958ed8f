"""Single sign-on's side of the accounts: which Atoll user an identity provider's subject is, and
one login applied in one transaction (the user found, linked or created, admin flag and mapped
memberships synced, a web-session key made), so a refused login leaves nothing behind. Admins
list the links, and link or unlink a subject by hand (an account the provider made anew, with a
new subject, for a user who already has one)."""

from __future__ import annotations

from dataclasses import dataclass

from nacl.signing import SigningKey

from atoll.plugins.gateway.accounts.audit import write_audit
from atoll.plugins.gateway.accounts.database import Connection
from atoll.plugins.gateway.accounts.keys import KeyRecord, Keys
from atoll.plugins.gateway.accounts.store import check_actor, not_found
from atoll.plugins.gateway.accounts.users import NAME
from atoll.plugins.gateway.errors import GatewayError

ACTOR = "sso"  # the audit log's actor for what a login changes
SESSION_KEY_NAME = "web session"


@dataclass(frozen=True)
class SignIn:
    """What the provider said of one login, as the gateway's config maps it."""

    issuer: str
    subject: str
    username: str  # the name a new user gets (a linked subject keeps its user)
    admin: bool | None  # None: the config maps no admin groups, the flag is left alone
    roles: dict[str, str | None]  # every mapped project: the user's role there, None for none
    create_users: bool
    match_existing_users: bool
    ttl_s: float


@dataclass(frozen=True)
class IdentityRecord:
    """One provider's account (issuer and subject) and the Atoll user it logs in as."""

    issuer: str
    subject: str
    user: str
    created: float
    last_login: float


class Identities(Keys):
    def list_identities(self, user: str | None = None) -> list[IdentityRecord]:
        """The links, of one user or of all."""
        rows = self._read(
            "SELECT issuer, subject, user, created, last_login FROM identities "
            "WHERE ? IS NULL OR user = ? ORDER BY user, issuer",
            (user, user),
        )
        return [IdentityRecord(*r) for r in rows]

    def link_identity(self, user: str, issuer: str, subject: str, *, actor: str) -> IdentityRecord:
        """Make ``subject`` of ``issuer`` log in as ``user`` (409 if either is linked already:
        unlink first)."""
        check_actor(actor)
        now = self._clock()
        with self._tx() as db:
            if not db.execute("SELECT 1 FROM users WHERE name = ?", (user,)).fetchone():
                raise not_found("user", user)
            taken = db.execute(
                "SELECT user, subject FROM identities "
                "WHERE issuer = ? AND (subject = ? OR user = ?)",
                (issuer, subject, user),
            ).fetchone()
            if taken is not None:
                said = (
                    f"account {subject!r} of {issuer} logs in as {taken[0]!r} already"
                    if taken[1] == subject
                    else f"user {user!r} is linked to another account of {issuer} already"
                )
                raise GatewayError(409, f"{said}: unlink it first", code="already_linked")
            db.execute(
                "INSERT INTO identities VALUES (?, ?, ?, ?, ?)", (issuer, subject, user, now, now)
            )
            detail = {"issuer": issuer, "subject": subject}
            write_audit(db, self._audit_key, now, actor, "identity.link", user, detail)
        return IdentityRecord(issuer, subject, user, now, now)

    def unlink_identity(self, issuer: str, subject: str, *, actor: str) -> IdentityRecord:
        """The provider's account no longer logs in as its user (whose keys stay as they are:
        revoke them apart)."""
        check_actor(actor)
        now = self._clock()
        with self._tx() as db:
            row = db.execute(
                "SELECT issuer, subject, user, created, last_login FROM identities "
                "WHERE issuer = ? AND subject = ?",
                (issuer, subject),
            ).fetchone()
            if row is None:
                raise not_found("identity", f"{issuer} {subject}")
            db.execute("DELETE FROM identities WHERE issuer = ? AND subject = ?", (issuer, subject))
            detail = {"issuer": issuer, "subject": subject}
            write_audit(db, self._audit_key, now, actor, "identity.unlink", row[2], detail)
        return IdentityRecord(*row)

    def sign_in(self, login: SignIn) -> tuple[KeyRecord, str]:
        """The user ``login`` is, with its memberships synced, and a new project-less key for
        the browser's session (shown this once). 403 when the config refuses this user."""
        now = self._clock()
        with self._tx() as db:
            user = self._user_of(db, login, now)
            if login.admin is not None:
                row = db.execute("SELECT admin FROM users WHERE name = ?", (user,)).fetchone()
                if bool(row[0]) != login.admin:
                    db.execute("UPDATE users SET admin = ? WHERE name = ?", (login.admin, user))
                    admin = {"admin": login.admin}
                    write_audit(db, self._audit_key, now, ACTOR, "user.set_admin", user, admin)
            for project, role in sorted(login.roles.items()):
                _sync_member(db, self._audit_key, project, user, role, now)
            record, key = self._insert_key(db, user, None, SESSION_KEY_NAME, login.ttl_s, None, now)
            detail = {"user": user, "project": None, "name": SESSION_KEY_NAME,
                      "ttl_s": login.ttl_s}  # fmt: skip
            write_audit(db, self._audit_key, now, ACTOR, "key.create", record.key_id, detail)
        return record, key

    def _user_of(self, db: Connection, login: SignIn, now: float) -> str:
        """The user linked to the subject, else the one named by the username claim, linked now
        (a new user when none has the name, an existing one only when the config says so)."""
        row = db.execute(
            "SELECT user FROM identities WHERE issuer = ? AND subject = ?",
            (login.issuer, login.subject),
        ).fetchone()
        if row is not None:
            db.execute(
                "UPDATE identities SET last_login = ? WHERE issuer = ? AND subject = ?",
                (now, login.issuer, login.subject),
            )
            return str(row[0])
        name = login.username
        if not NAME.fullmatch(name):
            raise GatewayError(
                403,
                f"the provider's user name {name[:80]!r} is not a valid Atoll user name (1-64 "
                "characters of a-z 0-9 . _ -): ask an administrator to set username_claim to a "
                "claim that is",
                code="invalid_user_name",
            )
        exists = db.execute("SELECT 1 FROM users WHERE name = ?", (name,)).fetchone()
        if exists:
            taken = db.execute(
                "SELECT subject FROM identities WHERE issuer = ? AND user = ?",
                (login.issuer, name),
            ).fetchone()
            if taken is not None or not login.match_existing_users:
                raise GatewayError(
                    403,
                    f"an Atoll user named {name!r} already exists and is not this account of "
                    "the identity provider: ask an administrator",
                    code="user_not_linked",
                )
        elif not login.create_users:
            raise GatewayError(
                403,
                f"there is no Atoll user {name!r}, and this gateway creates none at single "
                "sign-on: ask an administrator to create it",
                code="user_not_found",
            )
        else:
            db.execute("INSERT INTO users VALUES (?, ?, ?)", (name, False, now))
            write_audit(db, self._audit_key, now, ACTOR, "user.create", name, {"admin": False})
        db.execute(
            "INSERT INTO identities VALUES (?, ?, ?, ?, ?)",
            (login.issuer, login.subject, name, now, now),
        )
        detail = {"issuer": login.issuer, "subject": login.subject}
        write_audit(db, self._audit_key, now, ACTOR, "identity.link", name, detail)
        return name


def _sync_member(
    db: Connection, key: SigningKey, project: str, user: str, role: str | None, now: float
) -> None:
    """Make ``user``'s role in ``project`` be ``role`` (None: not a member): the provider's
    groups are the truth for the projects they map to. A mapped project is made if missing."""
    row = db.execute(
        "SELECT role FROM members WHERE project = ? AND user = ?", (project, user)
    ).fetchone()
    have = None if row is None else row[0]
    if have == role:
        return
    if role is None:
        db.execute("DELETE FROM members WHERE project = ? AND user = ?", (project, user))
        write_audit(db, key, now, ACTOR, "member.remove", project, {"user": user})
        return
    if not db.execute("SELECT 1 FROM projects WHERE name = ?", (project,)).fetchone():
        db.execute("INSERT INTO projects VALUES (?, ?, ?, ?, ?)", (project, "{}", False, None, now))
        detail = {"labels": {}, "store_prompts": False, "limits": None}
        write_audit(db, key, now, ACTOR, "project.create", project, detail)
    db.execute(
        "INSERT INTO members VALUES (?, ?, ?) "
        "ON CONFLICT (project, user) DO UPDATE SET role = excluded.role",
        (project, user, role),
    )
    write_audit(db, key, now, ACTOR, "member.add", project, {"user": user, "role": role})
