"""Deterministic demo data for the stub: users, upload sessions, transactions, rules.

The same seed always gives the same data, so tests and benchmarks can name ids. Every write
bumps version counters, and every response carries the one that covers it as
``data_version``: a session's views carry the session's version, all-sessions views and
/sessions the user's, /rules the rules' version. That is the ground truth a test uses to
prove that a read is not older than the caller's last write that changed it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from datetime import date, timedelta

# Example tokens for development and tests only; they grant nothing anywhere else.
DEMO_USERS: dict[str, tuple[str, bool]] = {
    "alice-token": ("alice", False),
    "bob-token": ("bob", False),
    "carol-token": ("carol", False),
    "dave-token": ("dave", False),
    "root-token": ("root", True),  # superuser: sees and edits every user's data
}

CATEGORIES = ("Groceries", "Transport", "Eating Out", "Bills", "Entertainment", "Shopping",
              "Health", "Income", "Uncategorised")

_MERCHANTS = {
    "Groceries": ("TESCO STORES", "SAINSBURYS", "ALDI", "LIDL GB", "WAITROSE", "CO-OP FOOD"),
    "Transport": ("TFL TRAVEL", "TRAINLINE", "UBER TRIP", "SHELL FUEL", "NATIONAL RAIL"),
    "Eating Out": ("PRET A MANGER", "NANDOS", "DELIVEROO", "COSTA COFFEE", "WAGAMAMA"),
    "Bills": ("BRITISH GAS", "THAMES WATER", "COUNCIL TAX", "VIRGIN MEDIA", "EE MOBILE"),
    "Entertainment": ("NETFLIX", "SPOTIFY", "ODEON CINEMAS", "STEAM GAMES"),
    "Shopping": ("AMAZON MKTPLACE", "JOHN LEWIS", "ARGOS", "IKEA", "EBAY"),
    "Health": ("BOOTS", "PUREGYM", "SUPERDRUG"),
    "Income": ("SALARY ACME LTD", "HMRC REFUND", "TRANSFER FROM SAVINGS"),
}


@dataclass
class Transaction:
    id: int
    session_id: str
    date: str
    description: str
    amount: float
    category: str

    def as_json(self) -> dict[str, object]:
        return {"id": self.id, "session_id": self.session_id, "date": self.date,
                "description": self.description, "amount": self.amount,
                "category": self.category}


@dataclass
class Session:
    id: str
    owner: str
    filename: str
    uploaded_at: str
    transactions: list[Transaction] = field(default_factory=list)
    version: int = 0  # bumped by every write that changes this session


@dataclass
class User:
    name: str
    superuser: bool
    data_version: int = 0  # bumped by every write of this user's data
    rules_version: int = 0  # bumped when the rules change
    sessions: dict[str, Session] = field(default_factory=dict)
    rules: list[dict[str, str]] = field(default_factory=list)


class Dataset:
    def __init__(self, seed: int = 7, sessions_per_user: int = 3,
                 min_txns: int = 200, max_txns: int = 2000) -> None:
        self.users: dict[str, User] = {}
        self.tokens: dict[str, User] = {}
        self.transactions: dict[int, Transaction] = {}
        next_id = 100_000
        for token, (name, superuser) in DEMO_USERS.items():
            user = User(name, superuser)
            self.users[name] = user
            self.tokens[token] = user
            if superuser:
                continue
            rng = random.Random(f"{seed}:{name}")
            start = date(2025, 1, 1)
            for n in range(1, sessions_per_user + 1):
                sid = f"{name}-s{n}"
                session = Session(sid, name, f"statement-{start:%Y-%m}-{n}.csv",
                                  f"{start + timedelta(days=30 * n):%Y-%m-%d}T09:00:00Z")
                for _ in range(rng.randint(min_txns, max_txns)):
                    category = rng.choice(CATEGORIES[:-1])
                    merchant = rng.choice(_MERCHANTS[category])
                    amount = round(rng.uniform(900, 3500), 2) if category == "Income" \
                        else -round(rng.uniform(1.5, 180), 2)
                    day = start + timedelta(days=30 * (n - 1) + rng.randint(0, 29))
                    # About a fifth arrive uncategorised: what bulk-categorise is for.
                    if rng.random() < 0.2:
                        category = "Uncategorised"
                    txn = Transaction(next_id, sid, day.isoformat(), merchant, amount, category)
                    next_id += 1
                    session.transactions.append(txn)
                    self.transactions[txn.id] = txn
                session.transactions.sort(key=lambda t: (t.date, t.id))
                user.sessions[sid] = session
            user.rules = [{"match": "TESCO", "category": "Groceries"},
                          {"match": "TFL", "category": "Transport"}]

    def user_for(self, token: str) -> User | None:
        return self.tokens.get(token)

    def visible_sessions(self, user: User) -> list[Session]:
        if user.superuser:
            return [s for u in self.users.values() for s in u.sessions.values()]
        return list(user.sessions.values())

    def session(self, user: User, sid: str) -> Session | None:
        for s in self.visible_sessions(user):
            if s.id == sid:
                return s
        return None

    def owner_of(self, session: Session) -> User:
        return self.users[session.owner]
