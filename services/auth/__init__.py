"""The auth service: connects a person's Claude account (OAuth 2.0 code flow + PKCE) and hands
the tokens, sealed to the vault's key, to the bus as `tokens.issued`. It never stores tokens."""
