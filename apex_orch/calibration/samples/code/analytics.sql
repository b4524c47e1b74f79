-- Schema and reporting queries for a small subscription business (PostgreSQL).

CREATE TABLE customers (
    id          BIGSERIAL PRIMARY KEY,
    email       TEXT NOT NULL UNIQUE,
    country     CHAR(2) NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE plans (
    id            SERIAL PRIMARY KEY,
    name          TEXT NOT NULL UNIQUE,
    monthly_cents INTEGER NOT NULL CHECK (monthly_cents >= 0)
);

CREATE TABLE subscriptions (
    id           BIGSERIAL PRIMARY KEY,
    customer_id  BIGINT NOT NULL REFERENCES customers(id),
    plan_id      INTEGER NOT NULL REFERENCES plans(id),
    started_on   DATE NOT NULL,
    cancelled_on DATE,
    CHECK (cancelled_on IS NULL OR cancelled_on >= started_on)
);

CREATE INDEX subscriptions_active_idx ON subscriptions (plan_id) WHERE cancelled_on IS NULL;

CREATE TABLE invoices (
    id              BIGSERIAL PRIMARY KEY,
    subscription_id BIGINT NOT NULL REFERENCES subscriptions(id),
    issued_on       DATE NOT NULL,
    amount_cents    INTEGER NOT NULL,
    paid_on         DATE
);

-- Monthly recurring revenue per plan, for subscriptions active on the first of each month.
WITH months AS (
    SELECT generate_series(date '2024-01-01', date '2024-12-01', interval '1 month')::date AS month
)
SELECT m.month,
       p.name                              AS plan,
       COUNT(*)                            AS active_subscriptions,
       SUM(p.monthly_cents) / 100.0        AS mrr
FROM months m
JOIN subscriptions s
  ON s.started_on <= m.month
 AND (s.cancelled_on IS NULL OR s.cancelled_on > m.month)
JOIN plans p ON p.id = s.plan_id
GROUP BY m.month, p.name
ORDER BY m.month, mrr DESC;

-- Monthly churn rate: cancellations during the month / active at its start.
WITH months AS (
    SELECT generate_series(date '2024-01-01', date '2024-12-01', interval '1 month')::date AS month
),
active AS (
    SELECT m.month, COUNT(s.id) AS n
    FROM months m
    LEFT JOIN subscriptions s
      ON s.started_on < m.month AND (s.cancelled_on IS NULL OR s.cancelled_on >= m.month)
    GROUP BY m.month
),
churned AS (
    SELECT date_trunc('month', cancelled_on)::date AS month, COUNT(*) AS n
    FROM subscriptions
    WHERE cancelled_on IS NOT NULL
    GROUP BY 1
)
SELECT a.month,
       a.n                                            AS active_at_start,
       COALESCE(c.n, 0)                               AS cancelled,
       ROUND(100.0 * COALESCE(c.n, 0) / NULLIF(a.n, 0), 2) AS churn_pct
FROM active a
LEFT JOIN churned c USING (month)
ORDER BY a.month;

-- Customers with unpaid invoices older than 30 days, oldest first.
SELECT c.email,
       COUNT(i.id)                      AS unpaid_invoices,
       SUM(i.amount_cents) / 100.0      AS amount_due,
       MIN(i.issued_on)                 AS oldest_invoice,
       current_date - MIN(i.issued_on)  AS days_overdue
FROM invoices i
JOIN subscriptions s ON s.id = i.subscription_id
JOIN customers c     ON c.id = s.customer_id
WHERE i.paid_on IS NULL
  AND i.issued_on < current_date - 30
GROUP BY c.email
ORDER BY oldest_invoice;

-- Cohort retention: share of each signup month still subscribed N months later.
WITH first_sub AS (
    SELECT customer_id, MIN(started_on) AS started_on
    FROM subscriptions
    GROUP BY customer_id
),
cohorts AS (
    SELECT customer_id, date_trunc('month', started_on)::date AS cohort
    FROM first_sub
),
activity AS (
    SELECT c.cohort, c.customer_id, gs.n AS months_later
    FROM cohorts c
    CROSS JOIN generate_series(0, 6) AS gs(n)
    WHERE EXISTS (
        SELECT 1 FROM subscriptions s
        WHERE s.customer_id = c.customer_id
          AND s.started_on <= (c.cohort + make_interval(months => gs.n))
          AND (s.cancelled_on IS NULL OR s.cancelled_on > (c.cohort + make_interval(months => gs.n)))
    )
)
SELECT cohort,
       months_later,
       COUNT(*) AS retained,
       ROUND(100.0 * COUNT(*) / FIRST_VALUE(COUNT(*)) OVER (PARTITION BY cohort ORDER BY months_later), 1)
           AS retained_pct
FROM activity
GROUP BY cohort, months_later
ORDER BY cohort, months_later;
