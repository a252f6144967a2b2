# MLflow tracking server with the Postgres driver, S3 client and basic-auth forms (Flask-WTF) it needs
# for the compose stack.
# The MLflow tag and the added packages are requirements.lock's (`make lock` rewrites the tag; a test checks it).
FROM ghcr.io/mlflow/mlflow:v3.17.2
COPY requirements.lock tools/lockfile.py /tmp/lock/
RUN python /tmp/lock/lockfile.py only boto3 botocore s3transfer jmespath psycopg2-binary flask-wtf wtforms \
        --lock /tmp/lock/requirements.lock > /tmp/lock/extra.lock \
    && pip install --no-cache-dir --no-deps --require-hashes -r /tmp/lock/extra.lock && rm -r /tmp/lock
