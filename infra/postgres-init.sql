-- One Postgres, two databases: MLflow's tracking/registry store and Prefect's orchestration store.
CREATE DATABASE mlflow;
CREATE DATABASE prefect;
