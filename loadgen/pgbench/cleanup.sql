-- Drops every scratch table of the baselines.
DROP TABLE IF EXISTS bench_user_coupons, bench_coupons, bench_payments, bench_balances, bench_products, bench_users;
