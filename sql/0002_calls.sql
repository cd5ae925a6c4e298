-- Calls in the ledger: one line per rated call carries both the customer's debit and the carrier's cost,
-- lines are written in batches, and balances move in one set-based step per statement.
--
-- Before: a BEFORE INSERT row trigger moved the balance of each line (one UPDATE per line, a provider line
-- per call). Now the writer states each line's balance after it; an AFTER INSERT statement trigger moves
-- every balance once per statement and refuses the statement unless each account's and each provider's
-- lines chain exactly from the balance they started from (balance_after = opening + running sum). The
-- database still guarantees that no balance changes without lines that add up to it.

-- Provider lines written under 0001 kept the provider's movement in amount_micro/balance_after_micro;
-- they move to the provider columns so that amount_micro always means "change of the account's balance".
ALTER TABLE ledger
    ADD COLUMN provider_amount_micro        bigint NOT NULL DEFAULT 0,  -- + raises what we owe the carrier
    ADD COLUMN provider_balance_after_micro bigint,
    ADD COLUMN seconds                      integer CHECK (seconds >= 0),  -- a call's answered seconds
    ADD COLUMN destination                  text,          -- the number dialled (call lines)
    ADD COLUMN answered_at                  timestamptz;   -- when the callee answered (call lines)
ALTER TABLE ledger ALTER COLUMN balance_after_micro DROP DEFAULT, ALTER COLUMN balance_after_micro DROP NOT NULL;

ALTER TABLE ledger DISABLE TRIGGER ledger_no_update;
UPDATE ledger SET provider_amount_micro = amount_micro, provider_balance_after_micro = balance_after_micro,
                  amount_micro = 0, balance_after_micro = NULL
    WHERE account_id IS NULL;
ALTER TABLE ledger ENABLE TRIGGER ledger_no_update;

ALTER TABLE ledger DROP CONSTRAINT ledger_check;
ALTER TABLE ledger
    ADD CONSTRAINT ledger_has_party CHECK (account_id IS NOT NULL OR provider_id IS NOT NULL),
    ADD CONSTRAINT ledger_account_chain CHECK ((account_id IS NULL) = (balance_after_micro IS NULL)
                                               AND (account_id IS NOT NULL OR amount_micro = 0)),
    ADD CONSTRAINT ledger_provider_chain CHECK ((provider_id IS NULL) = (provider_balance_after_micro IS NULL)
                                                AND (provider_id IS NOT NULL OR provider_amount_micro = 0));

DROP TRIGGER ledger_post ON ledger;
DROP FUNCTION ledger_post();

-- The ledger's foreign keys checked each line with its own query (35 us a line, more than everything else
-- the insert does): the statement trigger below checks every line's account and provider once per
-- statement instead, and accounts and providers are never deleted (closing one is a status).
ALTER TABLE ledger DROP CONSTRAINT ledger_account_id_fkey, DROP CONSTRAINT ledger_provider_id_fkey;

CREATE FUNCTION ledger_apply() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    parties bigint;
    moved bigint;
    broken bigint;
BEGIN
    PERFORM set_config('a2bd.posting', 'on', true);
    -- Accounts: move each balance once, by the sum of its lines, and check the lines chain from it.
    SELECT count(DISTINCT account_id) INTO parties FROM added WHERE account_id IS NOT NULL;
    WITH sums AS (
        SELECT account_id, sum(amount_micro) AS total, max(id) AS last FROM added
            WHERE account_id IS NOT NULL GROUP BY account_id
    ), upd AS (
        UPDATE accounts a SET balance_micro = a.balance_micro + s.total FROM sums s
            WHERE a.id = s.account_id RETURNING a.id, a.balance_micro - s.total AS opening
    ), chain AS (
        SELECT l.balance_after_micro AS stated,
               u.opening + sum(l.amount_micro) OVER (PARTITION BY l.account_id ORDER BY l.id) AS chained
        FROM added l JOIN upd u ON u.id = l.account_id
    )
    SELECT (SELECT count(*) FROM upd), count(*) FILTER (WHERE stated <> chained) INTO moved, broken FROM chain;
    IF moved <> parties THEN
        RAISE EXCEPTION 'ledger line(s) for an account that does not exist' USING ERRCODE = 'foreign_key_violation';
    END IF;
    IF broken > 0 THEN
        RAISE EXCEPTION '% ledger line(s) state an account balance that does not follow from the previous one',
            broken USING ERRCODE = 'check_violation';
    END IF;

    -- Providers: the same, with the carrier's side of each line.
    SELECT count(DISTINCT provider_id) INTO parties FROM added WHERE provider_id IS NOT NULL;
    WITH sums AS (
        SELECT provider_id, sum(provider_amount_micro) AS total FROM added
            WHERE provider_id IS NOT NULL GROUP BY provider_id
    ), upd AS (
        UPDATE providers p SET balance_micro = p.balance_micro + s.total FROM sums s
            WHERE p.id = s.provider_id RETURNING p.id, p.balance_micro - s.total AS opening
    ), chain AS (
        SELECT l.provider_balance_after_micro AS stated,
               u.opening + sum(l.provider_amount_micro) OVER (PARTITION BY l.provider_id ORDER BY l.id) AS chained
        FROM added l JOIN upd u ON u.id = l.provider_id
    )
    SELECT (SELECT count(*) FROM upd), count(*) FILTER (WHERE stated <> chained) INTO moved, broken FROM chain;
    IF moved <> parties THEN
        RAISE EXCEPTION 'ledger line(s) for a provider that does not exist' USING ERRCODE = 'foreign_key_violation';
    END IF;
    IF broken > 0 THEN
        RAISE EXCEPTION '% ledger line(s) state a provider balance that does not follow from the previous one',
            broken USING ERRCODE = 'check_violation';
    END IF;
    PERFORM set_config('a2bd.posting', 'off', true);
    RETURN NULL;
END $$;
CREATE TRIGGER ledger_apply AFTER INSERT ON ledger REFERENCING NEW TABLE AS added
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_apply();

-- Daily minute limit per account (device), as providers have: 0 = none. Counted in UTC days.
ALTER TABLE accounts
    ADD COLUMN daily_limit_s integer NOT NULL DEFAULT 0 CHECK (daily_limit_s >= 0),
    -- below its low-credit threshold right now: a notice is recorded once per crossing downward
    ADD COLUMN low_credit boolean NOT NULL DEFAULT false;

-- Notices for the customer (sent by e-mail with invoicing); recorded here first so none is lost.
CREATE TABLE notices (
    id          bigserial PRIMARY KEY,
    account_id  bigint NOT NULL REFERENCES accounts,
    kind        text NOT NULL CHECK (kind IN ('low_credit')),
    detail      jsonb NOT NULL DEFAULT '{}',
    created_at  timestamptz NOT NULL DEFAULT now(),
    sent_at     timestamptz
);
CREATE INDEX notices_unsent ON notices (id) WHERE sent_at IS NULL;

-- Accounts and providers carry money history: they are closed (status, enabled), never deleted.
CREATE FUNCTION never_deleted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% are never deleted (they have ledger history); close or disable instead', TG_TABLE_NAME
        USING ERRCODE = 'insufficient_privilege';
END $$;
CREATE TRIGGER accounts_never_deleted BEFORE DELETE ON accounts FOR EACH ROW EXECUTE FUNCTION never_deleted();
CREATE TRIGGER providers_never_deleted BEFORE DELETE ON providers FOR EACH ROW EXECUTE FUNCTION never_deleted();

-- The balance guard's function runs only when a balance moves outside a ledger statement (its WHEN is
-- checked without calling PL/pgSQL), so the writer's per-account updates do not pay for it.
DROP TRIGGER accounts_balance_guard ON accounts;
CREATE TRIGGER accounts_balance_guard BEFORE UPDATE OF balance_micro ON accounts
    FOR EACH ROW WHEN (coalesce(current_setting('a2bd.posting', true), 'off') <> 'on')
    EXECUTE FUNCTION balance_guard();
DROP TRIGGER providers_balance_guard ON providers;
CREATE TRIGGER providers_balance_guard BEFORE UPDATE OF balance_micro ON providers
    FOR EACH ROW WHEN (coalesce(current_setting('a2bd.posting', true), 'off') <> 'on')
    EXECUTE FUNCTION balance_guard();
