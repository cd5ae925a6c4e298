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
    ADD COLUMN seconds                      integer CHECK (seconds >= 0),  -- billed seconds of a call line
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

CREATE FUNCTION ledger_apply() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    broken bigint;
BEGIN
    PERFORM set_config('a2bd.posting', 'on', true);
    WITH sums AS (
        SELECT account_id, sum(amount_micro) AS total FROM added WHERE account_id IS NOT NULL GROUP BY account_id
    ), moved AS (
        UPDATE accounts a SET balance_micro = a.balance_micro + s.total FROM sums s
            WHERE a.id = s.account_id RETURNING a.id, a.balance_micro - s.total AS opening
    )
    SELECT count(*) INTO broken FROM (
        SELECT l.balance_after_micro AS stated,
               m.opening + sum(l.amount_micro) OVER (PARTITION BY l.account_id ORDER BY l.id) AS chained
        FROM added l JOIN moved m ON m.id = l.account_id
    ) c WHERE c.stated <> c.chained;
    IF broken > 0 THEN
        RAISE EXCEPTION '% ledger line(s) state an account balance that does not follow from the previous one',
            broken USING ERRCODE = 'check_violation';
    END IF;

    WITH sums AS (
        SELECT provider_id, sum(provider_amount_micro) AS total FROM added
            WHERE provider_id IS NOT NULL GROUP BY provider_id
    ), moved AS (
        UPDATE providers p SET balance_micro = p.balance_micro + s.total FROM sums s
            WHERE p.id = s.provider_id RETURNING p.id, p.balance_micro - s.total AS opening
    )
    SELECT count(*) INTO broken FROM (
        SELECT l.provider_balance_after_micro AS stated,
               m.opening + sum(l.provider_amount_micro) OVER (PARTITION BY l.provider_id ORDER BY l.id) AS chained
        FROM added l JOIN moved m ON m.id = l.provider_id
    ) c WHERE c.stated <> c.chained;
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

-- Reconciliation and daily counters read call lines by provider and day.
CREATE INDEX ledger_provider_calls ON ledger (provider_id, created_at) WHERE kind = 'call';
