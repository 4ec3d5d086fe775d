"""The IAM service's domain logic, composed: accounts, second factors, access control, logins."""

from __future__ import annotations

from rucher.iam.access import Access
from rucher.iam.accounts import Accounts
from rucher.iam.context import Context
from rucher.iam.login import Authenticator, ProviderFactory
from rucher.iam.realms.interface import PasswordRealm
from rucher.iam.tfa import SecondFactors
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
        self.factors = SecondFactors(context, self.accounts)
        self.access = Access(context, self.accounts)
        self.auth = Authenticator(context, self.factors, realms, providers)
