#!/usr/bin/env bash
# Deploy the dicom_storage DAG to a Cloud Composer 3 environment with gcloud. See docs/composer.md.
set -euo pipefail
export LC_ALL=C  # stable glob order, so the commands come out in the same order every time

usage() {
  cat <<'EOF'
Usage: scripts/deploy_composer.sh [--dry-run] --environment ENV --location LOCATION --project PROJECT
                                  --bucket BUCKET --landing-root ROOT [options]

Deploys this repository to a Cloud Composer 3 environment, in this order:
  1. reads the environment (gcloud composer environments describe): it must exist, and its
     custom PyPI packages are listed
  2. adds or updates only the packages of requirements.in (what a deployment installs) that
     Composer's image lacks, with their specifiers there: one environment update with
     --update-pypi-package per package that is missing or has another specifier. The packages
     the image provides (COMPOSER_PROVIDES: Airflow, the Google and Celery providers, the Google
     clients, Celery and the PostgreSQL drivers) are never installed: Composer pins them. Every
     other package of the environment (other teams' DAGs need them) is left as it is; nothing
     is ever removed.
  3. sets the pipeline's environment variables (--update-env-variables, which also merges):
     SEND_TO_GOOGLE=true, GOOGLE_CLOUD_STORAGE, GOOGLE_PROJECT_NAME, GOOGLE_STORAGE_COLLECTION
     (if given), DICOM_LANDING_ROOT, and any --set-env
  4. imports include/ to the environment bucket's data/include (storage data import)
  5. imports each entry of plugins/ to the bucket's plugins/ (storage plugins import)
  6. imports each entry of dags/ to the bucket's dags/ (storage dags import)
The code goes last, so it lands where its packages and settings already are. Steps 2 and 3 are
environment updates: each takes minutes and restarts Airflow workers and schedulers. Before any
change, the script prints (on stderr, lines starting with #) the packages it will set and the
existing ones it leaves alone.

Required (flag, or the environment variable in brackets):
  --environment ENV        Composer environment name               [COMPOSER_ENVIRONMENT]
  --location LOCATION      its region, e.g. us-central1            [COMPOSER_LOCATION]
  --project PROJECT        its Google Cloud project                [COMPOSER_PROJECT]
  --bucket BUCKET          archive bucket name -> GOOGLE_CLOUD_STORAGE
  --landing-root ROOT      landing zone -> DICOM_LANDING_ROOT: gs://bucket/prefix, or a path
                           under /home/airflow/gcs/data/ (the environment bucket's data/ folder)
Options:
  --collection IRB         default collection -> GOOGLE_STORAGE_COLLECTION
  --bigquery-project P     BigQuery project -> GOOGLE_PROJECT_NAME (default: --project)
  --set-env NAME=VALUE     one more environment variable (repeatable), e.g.
                           --set-env DICOM_REPLACE_CHANGED_ARCHIVES=true
  --skip-pypi-update       skip step 2 (packages unchanged since the last deploy)
  --skip-env-update        skip step 3 (variables unchanged since the last deploy)
  --dry-run                print the gcloud commands that change something instead of running
                           them; only the read-only describe of step 1 runs, when gcloud is
                           there, to show the packages (without gcloud it is printed too)
  --source-root DIR        deploy dags/, plugins/, include/ and requirements.in from DIR
                           (default: this repository)
  -h, --help               show this help

dags/ and plugins/ are imported entry by entry because importing a directory creates a
subfolder of that name in the bucket (dags/dags/...). A staging copy without __pycache__ is
uploaded; the --source paths printed by --dry-run point at it and it is removed on exit.
Imports add and overwrite files but never delete: remove files deleted locally with
`gcloud composer environments storage {dags,plugins,data} delete`.
Environment: GCLOUD (the gcloud command, default gcloud), TMPDIR.
EOF
}

die() { printf 'deploy_composer.sh: %s\n' "$*" >&2; exit 1; }
usage_error() {
  printf 'deploy_composer.sh: %s\n\n' "$*" >&2
  usage >&2
  exit 2
}

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
GCLOUD=${GCLOUD:-gcloud}
# Packages of requirements.in that every Composer 3 image (Airflow 3) already has, pinned by
# Composer; every other package of requirements.in is installed by step 2.
COMPOSER_PROVIDES=(apache-airflow apache-airflow-providers-google apache-airflow-providers-celery
  google-cloud-bigquery google-cloud-storage google-crc32c celery psycopg2-binary asyncpg pydantic)
MANAGED_VARIABLES=(SEND_TO_GOOGLE GOOGLE_CLOUD_STORAGE GOOGLE_PROJECT_NAME GOOGLE_STORAGE_COLLECTION
  DICOM_LANDING_ROOT)

env_name=${COMPOSER_ENVIRONMENT:-}
location=${COMPOSER_LOCATION:-}
project=${COMPOSER_PROJECT:-}
bucket=""
landing_root=""
collection=""
bigquery_project=""
extra_env=()
dry_run=false
skip_pypi=false
skip_env=false
source_root=$ROOT

# --name=value becomes --name value.
args=()
for arg in "$@"; do
  case $arg in
    --*=*) args+=("${arg%%=*}" "${arg#*=}") ;;
    *) args+=("$arg") ;;
  esac
done
set -- "${args[@]}"

while (($#)); do
  case $1 in
    -h | --help) usage; exit 0 ;;
    --dry-run) dry_run=true ;;
    --skip-pypi-update) skip_pypi=true ;;
    --skip-env-update) skip_env=true ;;
    --environment | --location | --project | --bucket | --landing-root | --collection | \
      --bigquery-project | --set-env | --source-root)
      (($# >= 2)) || usage_error "$1 needs a value"
      case $1 in
        --environment) env_name=$2 ;;
        --location) location=$2 ;;
        --project) project=$2 ;;
        --bucket) bucket=$2 ;;
        --landing-root) landing_root=$2 ;;
        --collection) collection=$2 ;;
        --bigquery-project) bigquery_project=$2 ;;
        --set-env) extra_env+=("$2") ;;
        --source-root) source_root=$2 ;;
      esac
      shift
      ;;
    *) usage_error "unknown argument: $1" ;;
  esac
  shift
done

# --- validation: everything wrong is reported at once -------------------------------------
problems=()
[[ -n $env_name ]] || problems+=("--environment (or COMPOSER_ENVIRONMENT) is required")
[[ -n $location ]] || problems+=("--location (or COMPOSER_LOCATION) is required")
[[ -n $project ]] || problems+=("--project (or COMPOSER_PROJECT) is required")
[[ -n $bucket ]] || problems+=("--bucket is required")
[[ -n $landing_root ]] || problems+=("--landing-root is required")
bigquery_project=${bigquery_project:-$project}

if [[ -n $bucket && ! $bucket =~ ^[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]$ ]]; then
  problems+=("--bucket must be a bucket name like my-archive, not '$bucket'")
fi
if [[ -n $landing_root && ! $landing_root =~ ^gs://[a-z0-9][a-z0-9._-]{1,220}[a-z0-9](/.*)?$ &&
  ! $landing_root =~ ^/home/airflow/gcs/data(/.*)?$ ]]; then
  problems+=("--landing-root must be gs://<bucket>/<prefix> or a path under /home/airflow/gcs/data/ (a path on this machine means nothing on Composer), not '$landing_root'")
fi

env_pairs=("SEND_TO_GOOGLE=true" "GOOGLE_CLOUD_STORAGE=$bucket" "GOOGLE_PROJECT_NAME=$bigquery_project")
[[ -z $collection ]] || env_pairs+=("GOOGLE_STORAGE_COLLECTION=$collection")
env_pairs+=("DICOM_LANDING_ROOT=$landing_root")
for pair in "${extra_env[@]}"; do
  name=${pair%%=*}
  if [[ $pair != *=* || ! $name =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]]; then
    problems+=("--set-env takes NAME=VALUE, not '$pair'")
  elif [[ " ${MANAGED_VARIABLES[*]} " == *" $name "* ]]; then
    problems+=("--set-env $name: use the dedicated option for $name")
  else
    env_pairs+=("$pair")
  fi
done
for pair in "${env_pairs[@]}"; do
  [[ $pair != *,* ]] || problems+=("environment variable values cannot contain a comma: '$pair'")
done

for folder in dags plugins include; do
  [[ -d $source_root/$folder ]] || problems+=("$source_root/$folder is not a directory")
done
[[ -f $source_root/requirements.in ]] || problems+=("$source_root/requirements.in is missing")

if ((${#problems[@]})); then
  printf -v message '%s\n' "${problems[@]}"
  usage_error "${message%$'\n'}"
fi

if ! $dry_run && ! command -v "$GCLOUD" >/dev/null; then
  die "gcloud not found ('$GCLOUD'); install the Google Cloud CLI, set GCLOUD, or use --dry-run"
fi

# --- staging: clean copies of the three folders and the PyPI requirements file -----------
stage=$(mktemp -d "${TMPDIR:-/tmp}/deploy-composer.XXXXXX")
trap 'rm -rf "$stage"' EXIT

for folder in dags plugins include; do
  cp -R "$source_root/$folder" "$stage/$folder"
  find "$stage/$folder" \( -name __pycache__ -o -name '*.pyc' -o -name .pytest_cache \) -prune \
    -exec rm -rf {} +
  [[ -n $(find "$stage/$folder" -type f -print -quit) ]] || die "$source_root/$folder has no files to deploy"
done

normalized() { sed -E 's/[-_.]+/-/g' <<<"${1,,}"; }  # PEP 503: pydicom, Some_New.Package -> some-new-package
ours=()      # NAME<specifier> of what Composer lacks, e.g. pydicom==3.0.2
provided=()  # the same, of what Composer's image has
declare -A named=()
# Each requirement line of requirements.in, without its comment and blanks.
mapfile -t requirements < <(sed -e 's/[[:space:]]*#.*$//' -e 's/[[:space:]]//g' "$source_root/requirements.in" |
  grep -v '^$' || true)
for requirement in "${requirements[@]}"; do
  [[ $requirement =~ ^([A-Za-z0-9][A-Za-z0-9._-]*)([=<>!~].*)?$ ]] ||
    die "requirements.in: cannot deploy '$requirement' (one package with a version specifier a line)"
  name=$(normalized "${BASH_REMATCH[1]}")
  [[ -z ${named[$name]:-} ]] || die "requirements.in names $name more than once"
  named[$name]=1
  if [[ " ${COMPOSER_PROVIDES[*]} " == *" $name "* ]]; then
    provided+=("$name${BASH_REMATCH[2]}")
  else
    ours+=("$name${BASH_REMATCH[2]}")
  fi
done
((${#ours[@]})) || die "requirements.in names no package that Composer's image lacks"

# --- the commands ---------------------------------------------------------------------------
# One shell word per argument, quoted only when needed (as Python's shlex.quote does).
quote() {
  if [[ $1 =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\"\'\"\'}"
  fi
}
run_line() {
  local line="" arg
  for arg in "$@"; do
    line+="${line:+ }$(quote "$arg")"
  done
  printf '%s' "$line"
}
run() {
  if $dry_run; then
    printf '%s\n' "$(run_line "$@")"
  else
    printf '+ %s\n' "$(run_line "$@")" >&2
    "$@"
  fi
}

target=(--location="$location" --project="$project")
environment=(--environment="$env_name" "${target[@]}")

# --- 1. the environment as it is ------------------------------------------------------------
# flattened: one "key: value" line per field, values aligned with spaces, e.g.
#   config.softwareConfig.pypiPackages.pandas:        >=2.0
#   config.softwareConfig.pypiPackages.scikit-learn:  ==1.5.2
describe=("$GCLOUD" composer environments describe "$env_name" "${target[@]}"
  --format='flattened(config.dagGcsPrefix,config.softwareConfig.pypiPackages)')
existing_known=true
if ! $dry_run; then
  printf '+ %s\n' "$(run_line "${describe[@]}")" >&2
  described=$("${describe[@]}")
else
  run "${describe[@]}"
  # Read-only: the dry run reads the environment when it can, to say what it would change.
  if command -v "$GCLOUD" >/dev/null && described=$("${describe[@]}" 2>/dev/null); then
    :
  else
    existing_known=false
    described=""
  fi
fi
declare -A existing=()  # lower-case name -> extras and specifier, as Composer stores them
prefix=config.softwareConfig.pypiPackages.
while IFS= read -r line; do
  [[ $line == "$prefix"* ]] || continue
  line=${line#"$prefix"}
  name=${line%%:*}
  value=${line#*:}
  value=${value#"${value%%[![:space:]]*}"}  # without the alignment before it
  value=${value%"${value##*[![:space:]]}"}  # nor blanks after it
  [[ $value == "''" ]] && value=""
  existing[${name,,}]=$value
done <<<"$described"

# --- 2. PyPI packages: merge ours into theirs ---------------------------------------------------
updates=()
declare -A ours_by_name=()
if $existing_known; then
  printf '# PyPI packages of %s: ours are set one by one, none is removed\n' "$env_name" >&2
else
  printf '# PyPI packages of %s: not read (no gcloud or no access); ours are set one by one,\n' "$env_name" >&2
  printf '#   so whatever else is installed stays as it is\n' >&2
fi
for requirement in "${ours[@]}"; do
  name=$(normalized "$(sed -E 's/^([A-Za-z0-9._-]+).*/\1/' <<<"$requirement")")
  specifier=${requirement:${#name}}
  ours_by_name[$name]=1
  current=""
  found=false
  for key in "${!existing[@]}"; do
    if [[ $(normalized "$key") == "$name" ]]; then
      current=${existing[$key]}
      found=true
    fi
  done
  if $found && [[ ${current// /} == "$specifier" ]]; then
    printf '#   keep  %s (already set)\n' "$requirement" >&2
  else
    if $found; then
      printf '#   set   %s (now %s%s)\n' "$requirement" "$name" "${current:-, any version}" >&2
    elif $existing_known; then
      printf '#   set   %s (new)\n' "$requirement" >&2
    else
      printf '#   set   %s\n' "$requirement" >&2
    fi
    updates+=("--update-pypi-package=$requirement")
  fi
done
for requirement in "${provided[@]}"; do
  printf '#   skip  %s (the Composer image provides it)\n' "$requirement" >&2
done
mapfile -t others < <(printf '%s\n' "${!existing[@]}" | sort)
for key in "${others[@]}"; do
  [[ -n $key && -z ${ours_by_name[$(normalized "$key")]:-} ]] || continue
  printf '#   leave %s%s (not ours)\n' "$key" "${existing[$key]}" >&2
done

if $skip_pypi; then
  printf '# --skip-pypi-update: no PyPI package is changed\n' >&2
elif ((${#updates[@]})); then
  run "$GCLOUD" composer environments update "$env_name" "${target[@]}" "${updates[@]}"
else
  printf '# every package of ours is already set: no PyPI update\n' >&2
fi
if ! $skip_env; then
  printf -v env_list '%s,' "${env_pairs[@]}"
  run "$GCLOUD" composer environments update "$env_name" "${target[@]}" \
    --update-env-variables="${env_list%,}"
fi
# include/ as a directory: it becomes data/include/ (mapped to /home/airflow/gcs/data/include).
run "$GCLOUD" composer environments storage data import "${environment[@]}" --source="$stage/include"
shopt -s dotglob nullglob  # entries like .airflowignore count
for entry in "$stage"/plugins/*; do
  run "$GCLOUD" composer environments storage plugins import "${environment[@]}" --source="$entry"
done
for entry in "$stage"/dags/*; do
  run "$GCLOUD" composer environments storage dags import "${environment[@]}" --source="$entry"
done

if ! $dry_run; then
  printf 'deploy_composer.sh: deployed to %s (%s, %s). Check the DAG for import errors in the Airflow UI.\n' \
    "$env_name" "$location" "$project" >&2
fi
