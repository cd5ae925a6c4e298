-- a2bd core schema: tariffs, providers, accounts, the append-only ledger.
-- Money is bigint micro-units (1e-6 of the currency) everywhere; rates are per minute.

CREATE TABLE resellers (
    id          serial PRIMARY KEY,
    name        text NOT NULL UNIQUE,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE tariffs (
    id          serial PRIMARY KEY,
    name        text NOT NULL UNIQUE CHECK (name <> ''),
    currency    char(3) NOT NULL DEFAULT 'EUR',
    version     bigint NOT NULL DEFAULT 1,   -- bumped by every change of its rates; daemons reload on it
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE providers (
    id                   serial PRIMARY KEY,
    name                 text NOT NULL UNIQUE CHECK (name ~ '^[A-Za-z0-9_.-]+$'),
    dial_template        text NOT NULL CHECK (dial_template LIKE '%{number}%'),
    enabled              boolean NOT NULL DEFAULT true,
    currency             char(3) NOT NULL DEFAULT 'EUR',
    balance_micro        bigint NOT NULL DEFAULT 0,   -- what we owe the carrier; moved only by the ledger
    balance_limit_micro  bigint NOT NULL DEFAULT 0 CHECK (balance_limit_micro >= 0),  -- 0 = no limit
    daily_limit_s        integer NOT NULL DEFAULT 0 CHECK (daily_limit_s >= 0),       -- 0 = no limit
    created_at           timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE rates (
    id                      bigserial PRIMARY KEY,
    tariff_id               integer NOT NULL REFERENCES tariffs ON DELETE CASCADE,
    prefix                  text NOT NULL CHECK (prefix ~ '^[0-9]{1,32}$'),
    destination             text NOT NULL DEFAULT '',
    rate_per_min_micro      bigint NOT NULL CHECK (rate_per_min_micro >= 0),
    connect_micro           bigint NOT NULL DEFAULT 0 CHECK (connect_micro >= 0),
    disconnect_micro        bigint NOT NULL DEFAULT 0 CHECK (disconnect_micro >= 0),
    initial_block_s         integer NOT NULL DEFAULT 0 CHECK (initial_block_s >= 0),
    increment_s             integer NOT NULL DEFAULT 1 CHECK (increment_s >= 1),
    grace_s                 integer NOT NULL DEFAULT 0 CHECK (grace_s >= 0),
    min_cost_micro          bigint NOT NULL DEFAULT 0 CHECK (min_cost_micro >= 0),
    provider_id             integer REFERENCES providers,
    buy_rate_per_min_micro  bigint NOT NULL DEFAULT 0 CHECK (buy_rate_per_min_micro >= 0),
    buy_initial_block_s     integer NOT NULL DEFAULT 0 CHECK (buy_initial_block_s >= 0),
    buy_increment_s         integer NOT NULL DEFAULT 1 CHECK (buy_increment_s >= 1),
    week_start_min          integer NOT NULL DEFAULT 0 CHECK (week_start_min BETWEEN 0 AND 10079),
    week_end_min            integer NOT NULL DEFAULT 10079 CHECK (week_end_min BETWEEN 0 AND 10079),
    start_date              date,
    stop_date               date,
    CHECK (start_date IS NULL OR stop_date IS NULL OR start_date <= stop_date)
);
CREATE INDEX rates_tariff_prefix ON rates (tariff_id, prefix);

CREATE TABLE accounts (
    id                          bigserial PRIMARY KEY,
    number                      text NOT NULL UNIQUE CHECK (number ~ '^[0-9]{4,20}$'),
    status                      text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'blocked', 'closed')),
    tariff_id                   integer NOT NULL REFERENCES tariffs,
    reseller_id                 integer REFERENCES resellers,   -- NULL: the admin is the issuer
    balance_micro               bigint NOT NULL DEFAULT 0,      -- moved only by the ledger (trigger below)
    credit_limit_micro          bigint NOT NULL DEFAULT 0 CHECK (credit_limit_micro >= 0),
    currency                    char(3) NOT NULL DEFAULT 'EUR',
    timezone                    text NOT NULL DEFAULT 'UTC',
    invoice_day                 smallint NOT NULL DEFAULT 1 CHECK (invoice_day BETWEEN 1 AND 28),
    vat_rate_ppm                integer NOT NULL DEFAULT 0 CHECK (vat_rate_ppm BETWEEN 0 AND 1000000),
    max_calls                   integer NOT NULL DEFAULT 0 CHECK (max_calls >= 0),  -- 0 = unlimited
    expires_at                  timestamptz,
    restrict_mode               text NOT NULL DEFAULT 'none' CHECK (restrict_mode IN ('none', 'deny', 'allow')),
    restrict_prefixes           text[] NOT NULL DEFAULT '{}',
    pin                         text UNIQUE CHECK (pin ~ '^[0-9]{4,32}$'),
    low_credit_threshold_micro  bigint NOT NULL DEFAULT 0,
    name                        text NOT NULL DEFAULT '',
    company                     text NOT NULL DEFAULT '',
    address                     text NOT NULL DEFAULT '',
    email                       text NOT NULL DEFAULT '',
    language                    text NOT NULL DEFAULT 'en',
    vat_number                  text NOT NULL DEFAULT '',
    created_at                  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE account_callerids (
    callerid    text PRIMARY KEY CHECK (callerid ~ '^[0-9]{3,32}$'),
    account_id  bigint NOT NULL REFERENCES accounts ON DELETE CASCADE
);
CREATE INDEX account_callerids_account ON account_callerids (account_id);

-- The ledger: every change of an account's or a provider's balance is one line, never edited.
CREATE TABLE ledger (
    id                   bigserial PRIMARY KEY,
    account_id           bigint REFERENCES accounts,
    provider_id          integer REFERENCES providers,
    kind                 text NOT NULL CHECK (kind IN ('initial', 'call', 'payment', 'refill', 'charge',
                                                       'correction', 'provider_call', 'provider_payment')),
    amount_micro         bigint NOT NULL,           -- signed: + credits the balance, - debits it
    balance_after_micro  bigint NOT NULL DEFAULT 0, -- set by the trigger, whatever the caller sends
    call_id              text,                      -- identity of a rated call: billed once
    description          text NOT NULL DEFAULT '',
    created_at           timestamptz NOT NULL DEFAULT now(),
    CHECK ((account_id IS NULL) <> (provider_id IS NULL))
);
CREATE UNIQUE INDEX ledger_call_once ON ledger (call_id, kind) WHERE call_id IS NOT NULL;
CREATE INDEX ledger_account ON ledger (account_id, id) WHERE account_id IS NOT NULL;
CREATE INDEX ledger_provider ON ledger (provider_id, id) WHERE provider_id IS NOT NULL;

CREATE FUNCTION ledger_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'ledger is append-only: % refused; post a correction line instead', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END $$;
CREATE TRIGGER ledger_no_update BEFORE UPDATE OR DELETE ON ledger
    FOR EACH ROW EXECUTE FUNCTION ledger_append_only();
CREATE TRIGGER ledger_no_truncate BEFORE TRUNCATE ON ledger
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_append_only();

-- Inserting a line is what moves the balance, and it records the balance after it.
CREATE FUNCTION ledger_post() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM set_config('a2bd.posting', 'on', true);
    IF NEW.account_id IS NOT NULL THEN
        UPDATE accounts SET balance_micro = balance_micro + NEW.amount_micro
            WHERE id = NEW.account_id RETURNING balance_micro INTO NEW.balance_after_micro;
    ELSE
        UPDATE providers SET balance_micro = balance_micro + NEW.amount_micro
            WHERE id = NEW.provider_id RETURNING balance_micro INTO NEW.balance_after_micro;
    END IF;
    PERFORM set_config('a2bd.posting', 'off', true);
    RETURN NEW;
END $$;
CREATE TRIGGER ledger_post BEFORE INSERT ON ledger FOR EACH ROW EXECUTE FUNCTION ledger_post();

-- A balance changes only through a ledger line.
CREATE FUNCTION balance_guard() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.balance_micro IS DISTINCT FROM OLD.balance_micro
       AND coalesce(current_setting('a2bd.posting', true), 'off') <> 'on' THEN
        RAISE EXCEPTION 'balance of % % changes only through a ledger line', TG_TABLE_NAME, OLD.id
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER accounts_balance_guard BEFORE UPDATE OF balance_micro ON accounts
    FOR EACH ROW EXECUTE FUNCTION balance_guard();
CREATE TRIGGER providers_balance_guard BEFORE UPDATE OF balance_micro ON providers
    FOR EACH ROW EXECUTE FUNCTION balance_guard();
CREATE FUNCTION balance_starts_at_zero() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.balance_micro <> 0 THEN
        RAISE EXCEPTION '% starts at a zero balance; post an initial line', TG_TABLE_NAME
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER accounts_balance_zero BEFORE INSERT ON accounts
    FOR EACH ROW EXECUTE FUNCTION balance_starts_at_zero();
CREATE TRIGGER providers_balance_zero BEFORE INSERT ON providers
    FOR EACH ROW EXECUTE FUNCTION balance_starts_at_zero();

-- Daemons hold tariffs in memory: any change of rates bumps the tariff's version and tells them.
CREATE FUNCTION rates_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE tariffs SET version = version + 1, updated_at = now()
        WHERE id IN (SELECT DISTINCT tariff_id FROM changed);
    PERFORM pg_notify('a2bd_tariffs', '');
    RETURN NULL;
END $$;
CREATE TRIGGER rates_inserted AFTER INSERT ON rates REFERENCING NEW TABLE AS changed
    FOR EACH STATEMENT EXECUTE FUNCTION rates_changed();
CREATE TRIGGER rates_updated AFTER UPDATE ON rates REFERENCING NEW TABLE AS changed
    FOR EACH STATEMENT EXECUTE FUNCTION rates_changed();
CREATE TRIGGER rates_deleted AFTER DELETE ON rates REFERENCING OLD TABLE AS changed
    FOR EACH STATEMENT EXECUTE FUNCTION rates_changed();

CREATE FUNCTION providers_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('a2bd_providers', '');
    RETURN NULL;
END $$;
CREATE TRIGGER providers_notify AFTER INSERT OR UPDATE OR DELETE ON providers
    FOR EACH STATEMENT EXECUTE FUNCTION providers_changed();
