-- Roles: who may do what to the money, enforced by PostgreSQL's privileges and not only by a2bd's code.
--
-- Two roles, both NOLOGIN (roles belong to the server, so they are created once and shared by every a2bd
-- database on it):
--
--   a2bd_owner  owns every table, sequence and function of the schema. Migrations run as it (`a2bd db
--               migrate` switches to it once this file is applied): log in as a role that is a member of
--               a2bd_owner, e.g. `CREATE ROLE a2bd_admin LOGIN IN ROLE a2bd_owner` (the role that applies
--               this file is made a member if it is not one already).
--   a2bd_app    what the daemon and the CLI (billing runs, posting, invoices) connect as: give it a login
--               of its own, `CREATE ROLE a2bd LOGIN PASSWORD '...' IN ROLE a2bd_app`, and use that in
--               postgres.url / A2BD_PG_URL. It may read the schema, insert ledger lines, invoices and
--               their tax rows and documents, and edit settings; it may never UPDATE, DELETE or TRUNCATE
--               a ledger line, an invoice's figures, a tax row or a document, nor set a balance: a balance
--               column is not among the columns it may insert or update. The ledger's statement trigger
--               moves balances with the owner's rights (SECURITY DEFINER below), so inserting ledger
--               lines is the one way the application can move money. It must never be a member of
--               a2bd_owner (nor a superuser): this file refuses to run if it is.
--
-- Asterisk's CDR table, when it lives in this database, is Asterisk's: grant a2bd_app SELECT on it.
-- A later migration that adds a table or a column grants a2bd_app what it needs there: by default it gets
-- SELECT on new tables and USAGE on new sequences, nothing more.

DO $$
BEGIN
    -- Two databases migrated at once may both try: the loser's CREATE ROLE fails, and that is fine.
    IF to_regrole('a2bd_owner') IS NULL THEN
        BEGIN
            CREATE ROLE a2bd_owner NOLOGIN;
        EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL;
        END;
    END IF;
    IF to_regrole('a2bd_app') IS NULL THEN
        BEGIN
            CREATE ROLE a2bd_app NOLOGIN;
        EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL;
        END;
    END IF;
    IF pg_has_role('a2bd_app', 'a2bd_owner', 'MEMBER') THEN
        RAISE EXCEPTION 'role a2bd_app is a superuser or a member of a2bd_owner: it would own the ledger it '
                        'must not edit; revoke that first'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF NOT pg_has_role(current_user, 'a2bd_owner', 'MEMBER') THEN
        EXECUTE format('GRANT a2bd_owner TO %I', current_user);
    END IF;
    EXECUTE format('GRANT USAGE, CREATE ON SCHEMA %I TO a2bd_owner', current_schema());
    EXECUTE format('GRANT USAGE ON SCHEMA %I TO a2bd_app', current_schema());
END $$;

-- The owner owns everything the migrations made (sequences and indexes follow their tables). Asterisk's
-- CDR table and anything else in the schema stay with whoever owns them.
ALTER TABLE schema_migrations OWNER TO a2bd_owner;
ALTER TABLE resellers OWNER TO a2bd_owner;
ALTER TABLE tariffs OWNER TO a2bd_owner;
ALTER TABLE providers OWNER TO a2bd_owner;
ALTER TABLE rates OWNER TO a2bd_owner;
ALTER TABLE accounts OWNER TO a2bd_owner;
ALTER TABLE account_callerids OWNER TO a2bd_owner;
ALTER TABLE ledger OWNER TO a2bd_owner;
ALTER TABLE notices OWNER TO a2bd_owner;
ALTER TABLE tax_classes OWNER TO a2bd_owner;
ALTER TABLE kind_tax_classes OWNER TO a2bd_owner;
ALTER TABLE issuers OWNER TO a2bd_owner;
ALTER TABLE invoice_prefixes OWNER TO a2bd_owner;
ALTER TABLE invoices OWNER TO a2bd_owner;
ALTER TABLE invoice_taxes OWNER TO a2bd_owner;
ALTER TABLE invoice_documents OWNER TO a2bd_owner;
ALTER TABLE services OWNER TO a2bd_owner;
ALTER TABLE packages OWNER TO a2bd_owner;
ALTER FUNCTION ledger_append_only() OWNER TO a2bd_owner;
ALTER FUNCTION ledger_apply() OWNER TO a2bd_owner;
ALTER FUNCTION balance_guard() OWNER TO a2bd_owner;
ALTER FUNCTION balance_starts_at_zero() OWNER TO a2bd_owner;
ALTER FUNCTION rates_changed() OWNER TO a2bd_owner;
ALTER FUNCTION providers_changed() OWNER TO a2bd_owner;
ALTER FUNCTION never_deleted() OWNER TO a2bd_owner;
ALTER FUNCTION invoice_frozen() OWNER TO a2bd_owner;

-- Inserting ledger lines is what moves balances: the statement trigger does it as the owner, the only
-- role that may write a balance column. Its search_path is fixed (this schema, then pg_temp last) so that
-- nobody can slip it a table of their own. The balance guard stays for the owner's own sessions: the
-- a2bd.posting flag it reads can be set by anyone, which is why the application's refusal is a privilege.
ALTER FUNCTION ledger_apply() SECURITY DEFINER;
DO $$
BEGIN
    EXECUTE format('ALTER FUNCTION ledger_apply() SET search_path = %I, pg_temp', current_schema());
END $$;

-- What the application reads: everything of a2bd's (the daemon checks schema_migrations at start).
GRANT SELECT ON schema_migrations, resellers, tariffs, providers, rates, accounts, account_callerids, ledger,
    notices, tax_classes, kind_tax_classes, issuers, invoice_prefixes, invoices, invoice_taxes,
    invoice_documents, services, packages TO a2bd_app;
GRANT USAGE, SELECT ON SEQUENCE resellers_id_seq, tariffs_id_seq, providers_id_seq, rates_id_seq,
    accounts_id_seq, ledger_id_seq, notices_id_seq, issuers_id_seq, invoices_id_seq, services_id_seq,
    packages_id_seq TO a2bd_app;

-- Money: lines, invoices, their tax rows and documents are only ever added. A draft invoice becomes
-- confirmed (numbered) or discarded, once: those columns only, and the invoices_frozen trigger still
-- refuses any other change, as it does for every role.
GRANT INSERT ON ledger, invoices, invoice_taxes, invoice_documents TO a2bd_app;
GRANT UPDATE (status, number, seq, confirmed_at, discarded_at) ON invoices TO a2bd_app;

-- Accounts and providers: created and edited, never their balance (nor their id or creation time). The
-- write paths lock these rows (SELECT ... FOR UPDATE), which needs UPDATE on some column: they have it.
GRANT INSERT (number, status, tariff_id, reseller_id, credit_limit_micro, currency, timezone, invoice_day,
              vat_rate_ppm, max_calls, expires_at, restrict_mode, restrict_prefixes, pin,
              low_credit_threshold_micro, name, company, address, email, language, vat_number, daily_limit_s,
              low_credit, last_name, tax_mode, invoices_enabled, invoiced_through_id, period_start,
              next_close_at, initial_balance_micro, autorefill, expiry_mode, expiry_days, first_use_at)
    ON accounts TO a2bd_app;
GRANT UPDATE (status, tariff_id, reseller_id, credit_limit_micro, currency, timezone, invoice_day,
              vat_rate_ppm, max_calls, expires_at, restrict_mode, restrict_prefixes, pin,
              low_credit_threshold_micro, name, company, address, email, language, vat_number, daily_limit_s,
              low_credit, last_name, tax_mode, invoices_enabled, invoiced_through_id, period_start,
              next_close_at, initial_balance_micro, autorefill, expiry_mode, expiry_days, first_use_at)
    ON accounts TO a2bd_app;
GRANT INSERT (name, dial_template, enabled, currency, balance_limit_micro, daily_limit_s) ON providers TO a2bd_app;
GRANT UPDATE (dial_template, enabled, balance_limit_micro, daily_limit_s) ON providers TO a2bd_app;
GRANT INSERT ON account_callerids TO a2bd_app;

-- Tariffs: `a2bd tariff import` replaces a tariff's rates; the rates trigger bumps its version.
GRANT INSERT ON tariffs TO a2bd_app;
GRANT UPDATE (version, updated_at) ON tariffs TO a2bd_app;
GRANT INSERT, DELETE ON rates TO a2bd_app;

-- Invoicing's settings and the scheduler's bookkeeping (no money in them).
GRANT INSERT, UPDATE ON issuers, services, packages, notices TO a2bd_app;
GRANT INSERT ON invoice_prefixes TO a2bd_app;
GRANT UPDATE (prefix, next_number) ON invoice_prefixes TO a2bd_app;

-- What later migrations create as the owner: readable by the application, writable only where they say.
DO $$
BEGIN
    EXECUTE format('ALTER DEFAULT PRIVILEGES FOR ROLE a2bd_owner IN SCHEMA %I GRANT SELECT ON TABLES TO a2bd_app',
                   current_schema());
    EXECUTE format('ALTER DEFAULT PRIVILEGES FOR ROLE a2bd_owner IN SCHEMA %I '
                   'GRANT USAGE, SELECT ON SEQUENCES TO a2bd_app', current_schema());
END $$;
