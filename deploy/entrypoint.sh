#!/bin/sh
# The image's entry point: bring the catalog and Dagster's storage up to this code (idempotent,
# serialized by the catalog's migration lock), then run the command.
set -e
if [ "$1" = vbs ] && [ "$2" = migrate ]; then
    exec "$@"
fi
vbs migrate
exec "$@"
