-- The target as RDS hands it over: the master user is no superuser but may
-- create roles, and owns an empty database.
CREATE ROLE rds_master LOGIN PASSWORD 'rds-secret' NOSUPERUSER NOREPLICATION CREATEDB CREATEROLE;
CREATE DATABASE shop OWNER rds_master;
