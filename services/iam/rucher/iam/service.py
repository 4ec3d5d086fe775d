"""The IAM service's domain logic, composed: accounts, access control, and logins."""

from __future__ import annotations

from rucher.iam.access import Access
from rucher.iam.accounts import Accounts
from rucher.iam.context import Context
from rucher.iam.login import Authenticator, ProviderFactory
from rucher.iam.realms.interface import PasswordRealm
from rucher.proto.iam_state import RealmType


class IamService:
    """Everything the IAM subjects answer, depending only on the context's small protocols."""

    def __init__(
        self,
        context: Context,
        realms: dict[RealmType, PasswordRealm],
        providers: ProviderFactory,
    ) -> None:
        self.context = context
        self.accounts = Accounts(context, realms)
        self.access = Access(context, self.accounts)
        self.auth = Authenticator(context, self.accounts, realms, providers)
