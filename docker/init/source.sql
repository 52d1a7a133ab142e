-- The source as Heroku hands it over: an owner that is neither superuser nor
-- replication, and a pgbench schema (pgbench_history gets the key it lacks).
CREATE ROLE app LOGIN PASSWORD 'app-secret' NOSUPERUSER NOREPLICATION NOCREATEDB NOCREATEROLE;
CREATE DATABASE shop OWNER app;
\connect shop app
\! pgbench -i -s 10 -U app shop
ALTER TABLE pgbench_history ADD COLUMN id bigserial PRIMARY KEY;
