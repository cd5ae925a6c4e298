-- Invoicing: bank-statement invoices over the ledger, issuers and their gapless numbering, tax classes,
-- recurring services (DIDs, subscriptions), free-minute packages, account expiry modes, e-mail notices.
--
-- An invoice does not copy lines: it names a range of the account's ledger ids (from_line_id, through_line_id]
-- plus the tax lines posted for it (ledger.invoice_id). The open *preview* is every line of the account after
-- `accounts.invoiced_through_id`. Closing moves that mark under the account's row lock, the same lock every
-- posting takes, and the ledger refuses a line at or below the mark: nothing is invoiced twice or lost.

-- Charge kinds of money without calls (DESIGN §1.5).
ALTER TABLE ledger DROP CONSTRAINT ledger_kind_check;
ALTER TABLE ledger ADD CONSTRAINT ledger_kind_check CHECK (kind IN (
    'initial', 'call', 'payment', 'refill', 'charge', 'correction', 'did', 'subscription', 'service', 'tax',
    'provider_call', 'provider_payment'));

-- What a line is taxed as. A tax class names a rate; NULL rate = the account's own VAT rate.
CREATE TABLE tax_classes (
    name         text PRIMARY KEY CHECK (name ~ '^[a-z0-9_]{1,32}$'),
    rate_ppm     integer CHECK (rate_ppm BETWEEN 0 AND 1000000),
    description  text NOT NULL DEFAULT ''
);
INSERT INTO tax_classes (name, rate_ppm, description) VALUES
    ('standard', NULL, 'the account''s VAT rate'),
    ('exempt', 0, 'not subject to VAT');

-- The class each kind of charge is taxed in unless its line names another. Kinds absent here (payments,
-- refills, the initial balance, tax lines themselves) are not supplies and are never taxed.
CREATE TABLE kind_tax_classes (
    kind       text PRIMARY KEY,
    tax_class  text NOT NULL REFERENCES tax_classes
);
INSERT INTO kind_tax_classes (kind, tax_class) VALUES
    ('call', 'standard'), ('charge', 'standard'), ('correction', 'standard'), ('did', 'standard'),
    ('subscription', 'standard'), ('service', 'standard');

-- Whoever issues invoices: the admin (reseller_id NULL) and each reseller, with the prefix its numbers carry now.
CREATE TABLE issuers (
    id              serial PRIMARY KEY,
    reseller_id     integer UNIQUE REFERENCES resellers,
    name            text NOT NULL,
    company         text NOT NULL DEFAULT '',
    address         text NOT NULL DEFAULT '',
    vat_number      text NOT NULL DEFAULT '',
    email           text NOT NULL DEFAULT '',
    invoice_prefix  text NOT NULL,
    mode            text NOT NULL DEFAULT 'confirm' CHECK (mode IN ('confirm', 'draft'))
);
CREATE UNIQUE INDEX issuers_one_admin ON issuers ((true)) WHERE reseller_id IS NULL;

-- One gapless sequence per prefix, each prefix owned by one issuer for ever (a number is the prefix and six
-- or more digits; a prefix ends with a non-digit, so a number tells its prefix and no two prefixes can
-- make the same number). next_number is taken under this row's lock in the closing transaction.
CREATE TABLE invoice_prefixes (
    prefix       text PRIMARY KEY CHECK (prefix ~ '^([A-Za-z0-9/_.-]{0,19}[A-Za-z/_.-])?$'),
    issuer_id    integer NOT NULL REFERENCES issuers,
    next_number  bigint NOT NULL DEFAULT 1 CHECK (next_number >= 1)
);
ALTER TABLE issuers ADD FOREIGN KEY (invoice_prefix) REFERENCES invoice_prefixes DEFERRABLE INITIALLY DEFERRED;
INSERT INTO issuers (reseller_id, name, invoice_prefix) VALUES (NULL, 'a2bd', 'INV-');
INSERT INTO invoice_prefixes (prefix, issuer_id) SELECT 'INV-', id FROM issuers;

ALTER TABLE accounts
    ADD COLUMN last_name             text NOT NULL DEFAULT '',
    ADD COLUMN tax_mode              text NOT NULL DEFAULT 'invoice' CHECK (tax_mode IN ('invoice', 'payment')),
    ADD COLUMN invoices_enabled      boolean NOT NULL DEFAULT true,
    ADD COLUMN invoiced_through_id   bigint NOT NULL DEFAULT 0,   -- last ledger id of the last closed period
    ADD COLUMN period_start          timestamptz,                 -- start of the open preview (NULL: created_at)
    ADD COLUMN next_close_at         timestamptz,                 -- the scheduler's next close (NULL: not computed)
    ADD COLUMN initial_balance_micro bigint NOT NULL DEFAULT 0 CHECK (initial_balance_micro >= 0),
    ADD COLUMN autorefill            boolean NOT NULL DEFAULT false,  -- top up to initial_balance at each close
    -- A2Billing's expiry modes: a fixed date, N days after first use, N days after creation.
    ADD COLUMN expiry_mode           text NOT NULL DEFAULT 'none'
        CHECK (expiry_mode IN ('none', 'date', 'after_first_use', 'after_creation')),
    ADD COLUMN expiry_days           integer NOT NULL DEFAULT 0 CHECK (expiry_days >= 0),
    ADD COLUMN first_use_at          timestamptz;

ALTER TABLE ledger
    ADD COLUMN tax_class   text REFERENCES tax_classes,  -- NULL: the class of its kind (kind_tax_classes)
    ADD COLUMN invoice_id  bigint,                       -- a tax line posted for this (draft) invoice
    ADD COLUMN service_id  bigint,                       -- the recurring service a line charges
    ADD COLUMN free_s      integer CHECK (free_s >= 0),  -- a call's seconds covered by a free-minute package
    -- tax lines: the rate and the net base they were computed on (amount_micro = -tax)
    ADD COLUMN tax_rate_ppm    integer CHECK (tax_rate_ppm BETWEEN 0 AND 1000000),
    ADD COLUMN tax_base_micro  bigint,
    ADD CONSTRAINT ledger_tax_line CHECK ((kind = 'tax') = (tax_rate_ppm IS NOT NULL AND tax_base_micro IS NOT NULL));
CREATE INDEX ledger_invoice ON ledger (invoice_id) WHERE invoice_id IS NOT NULL;

CREATE TABLE invoices (
    id               bigserial PRIMARY KEY,
    account_id       bigint NOT NULL REFERENCES accounts,
    issuer_id        integer NOT NULL REFERENCES issuers,
    status           text NOT NULL CHECK (status IN ('draft', 'confirmed', 'discarded')),
    number           text UNIQUE,
    seq              bigint,
    period_start     timestamptz NOT NULL,
    period_end       timestamptz NOT NULL,
    from_line_id     bigint NOT NULL,        -- exclusive
    through_line_id  bigint NOT NULL,        -- inclusive
    opening_micro    bigint NOT NULL,        -- balance carried forward
    lines_micro      bigint NOT NULL,        -- sum of the period's lines before this invoice's own tax
    tax_micro        bigint NOT NULL,        -- tax charged by this invoice (posted as tax lines)
    closing_micro    bigint NOT NULL,        -- opening + lines - tax: carried into the next preview
    net_micro        bigint NOT NULL,        -- taxable charges, net
    payments_micro   bigint NOT NULL,        -- payments and refills received in the period
    line_count       integer NOT NULL,
    currency         char(3) NOT NULL,
    timezone         text NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now(),
    confirmed_at     timestamptz,
    discarded_at     timestamptz,
    UNIQUE (issuer_id, seq),
    CHECK ((status = 'confirmed') = (number IS NOT NULL AND seq IS NOT NULL AND confirmed_at IS NOT NULL)),
    CHECK (from_line_id <= through_line_id),
    CHECK (closing_micro = opening_micro + lines_micro - tax_micro)
);
CREATE INDEX invoices_account ON invoices (account_id, id);
CREATE INDEX invoices_period ON invoices (period_end);
-- At most one draft waits per account: it must be confirmed or discarded before the next close.
CREATE UNIQUE INDEX invoices_one_draft ON invoices (account_id) WHERE status = 'draft';

-- The tax of an invoice per class and rate, rounded once per row (domain/invoice.py says how).
CREATE TABLE invoice_taxes (
    invoice_id  bigint NOT NULL REFERENCES invoices,
    tax_class   text NOT NULL,
    rate_ppm    integer NOT NULL,
    net_micro   bigint NOT NULL,
    tax_micro   bigint NOT NULL,
    PRIMARY KEY (invoice_id, tax_class, rate_ppm)
);

-- The PDF of a confirmed invoice, made once.
CREATE TABLE invoice_documents (
    invoice_id  bigint PRIMARY KEY REFERENCES invoices,
    pdf         bytea NOT NULL,
    sha256      text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- A confirmed invoice never changes; a draft may only be confirmed (numbered) or discarded, once.
CREATE FUNCTION invoice_frozen() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE' AND OLD.status = 'draft' AND NEW.status IN ('confirmed', 'discarded')
       AND (NEW.account_id, NEW.issuer_id, NEW.period_start, NEW.period_end, NEW.from_line_id,
            NEW.through_line_id, NEW.opening_micro, NEW.lines_micro, NEW.tax_micro, NEW.closing_micro,
            NEW.net_micro, NEW.payments_micro, NEW.line_count)
           IS NOT DISTINCT FROM
           (OLD.account_id, OLD.issuer_id, OLD.period_start, OLD.period_end, OLD.from_line_id,
            OLD.through_line_id, OLD.opening_micro, OLD.lines_micro, OLD.tax_micro, OLD.closing_micro,
            OLD.net_micro, OLD.payments_micro, OLD.line_count) THEN
        RETURN NEW;
    END IF;
    RAISE EXCEPTION 'invoice % is %: a closed invoice never changes; post a correction line instead',
        OLD.id, OLD.status USING ERRCODE = 'insufficient_privilege';
END $$;
CREATE TRIGGER invoices_frozen BEFORE UPDATE OR DELETE ON invoices FOR EACH ROW EXECUTE FUNCTION invoice_frozen();
CREATE TRIGGER invoice_taxes_frozen BEFORE UPDATE OR DELETE ON invoice_taxes
    FOR EACH ROW EXECUTE FUNCTION ledger_append_only();
CREATE TRIGGER invoice_documents_frozen BEFORE UPDATE OR DELETE ON invoice_documents
    FOR EACH ROW EXECUTE FUNCTION ledger_append_only();
CREATE TRIGGER invoices_no_truncate BEFORE TRUNCATE ON invoices
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_append_only();

-- Recurring services: DID rentals, subscriptions, trunk channels... each charged per period by the scheduler.
CREATE TABLE services (
    id              bigserial PRIMARY KEY,
    account_id      bigint NOT NULL REFERENCES accounts,
    kind            text NOT NULL CHECK (kind IN ('did', 'subscription', 'service')),
    name            text NOT NULL CHECK (name <> ''),
    did             text CHECK (did ~ '^[0-9]{3,32}$'),
    amount_micro    bigint NOT NULL CHECK (amount_micro >= 0),  -- net price per period
    tax_class       text REFERENCES tax_classes,
    period          text NOT NULL DEFAULT 'month' CHECK (period IN ('day', 'week', 'month', 'year')),
    every           integer NOT NULL DEFAULT 1 CHECK (every BETWEEN 1 AND 120),
    anchor_day      smallint NOT NULL CHECK (anchor_day BETWEEN 1 AND 31),  -- monthly: the day it renews on
    next_charge_at  timestamptz NOT NULL,
    status          text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'suspended', 'cancelled')),
    reminder_days   integer NOT NULL DEFAULT 0 CHECK (reminder_days BETWEEN 0 AND 365),
    reminded_for    timestamptz,   -- the renewal a reminder was recorded for
    created_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX services_due ON services (next_charge_at) WHERE status = 'active';
CREATE INDEX services_account ON services (account_id);
CREATE UNIQUE INDEX services_did ON services (did) WHERE did IS NOT NULL AND status <> 'cancelled';

-- Packages of free minutes: seconds per billing period, counted afresh in each of the account's periods.
CREATE TABLE packages (
    id           bigserial PRIMARY KEY,
    account_id   bigint NOT NULL REFERENCES accounts,
    name         text NOT NULL CHECK (name <> ''),
    free_s       integer NOT NULL CHECK (free_s > 0),
    prefixes     text[] NOT NULL DEFAULT '{}',   -- destinations it covers (empty: all)
    used_s       integer NOT NULL DEFAULT 0 CHECK (used_s >= 0),  -- seconds used in period `period`
    period       timestamptz,  -- the account's period used_s counts in (another: nothing used yet)
    active       boolean NOT NULL DEFAULT true,
    created_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX packages_account ON packages (account_id) WHERE active;

-- Notices become e-mails: who to, what, how many attempts, what the server said.
ALTER TABLE notices DROP CONSTRAINT notices_kind_check;
ALTER TABLE notices
    ADD CONSTRAINT notices_kind_check CHECK (kind IN ('low_credit', 'renewal_reminder', 'service_suspended',
                                                      'invoice', 'expired')),
    ADD COLUMN to_address       text,
    ADD COLUMN subject          text,
    ADD COLUMN attempts         integer NOT NULL DEFAULT 0,
    ADD COLUMN next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    ADD COLUMN last_error       text,
    ADD COLUMN smtp_reply       text,
    ADD COLUMN message_id       text,
    ADD COLUMN failed_at        timestamptz;   -- given up (permanent refusal or too many attempts)
DROP INDEX notices_unsent;
CREATE INDEX notices_unsent ON notices (next_attempt_at) WHERE sent_at IS NULL AND failed_at IS NULL;

-- The ledger statement trigger again, now also refusing an account line at or below the account's invoiced
-- mark (a closed period) unless it is a tax line posted for a named invoice. It is raised as a serialization
-- failure: the writer retries it and the line lands in the open preview.
CREATE OR REPLACE FUNCTION ledger_apply() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    parties bigint;
    moved bigint;
    broken bigint;
    closed bigint;
BEGIN
    PERFORM set_config('a2bd.posting', 'on', true);
    SELECT count(DISTINCT account_id) INTO parties FROM added WHERE account_id IS NOT NULL;
    WITH sums AS (
        SELECT account_id, sum(amount_micro) AS total FROM added
            WHERE account_id IS NOT NULL GROUP BY account_id
    ), upd AS (
        UPDATE accounts a SET balance_micro = a.balance_micro + s.total FROM sums s
            WHERE a.id = s.account_id
            RETURNING a.id, a.balance_micro - s.total AS opening, a.invoiced_through_id AS through
    ), chain AS (
        SELECT l.balance_after_micro AS stated, l.id <= u.through AND l.invoice_id IS NULL AS in_closed,
               u.opening + sum(l.amount_micro) OVER (PARTITION BY l.account_id ORDER BY l.id) AS chained
        FROM added l JOIN upd u ON u.id = l.account_id
    )
    SELECT (SELECT count(*) FROM upd), count(*) FILTER (WHERE stated <> chained), count(*) FILTER (WHERE in_closed)
        INTO moved, broken, closed FROM chain;
    IF moved <> parties THEN
        RAISE EXCEPTION 'ledger line(s) for an account that does not exist' USING ERRCODE = 'foreign_key_violation';
    END IF;
    IF broken > 0 THEN
        RAISE EXCEPTION '% ledger line(s) state an account balance that does not follow from the previous one',
            broken USING ERRCODE = 'check_violation';
    END IF;
    IF closed > 0 THEN
        RAISE EXCEPTION '% ledger line(s) would fall into a closed invoice period; retry', closed
            USING ERRCODE = 'serialization_failure';
    END IF;

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

CREATE INDEX accounts_next_close ON accounts (next_close_at) WHERE invoices_enabled;

-- Reports by date range over all accounts (charge history): lines are written roughly in time order, so a
-- BRIN index finds a month's lines for a few pages of index and next to no write cost.
CREATE INDEX ledger_created ON ledger USING brin (created_at);
