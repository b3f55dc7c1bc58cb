#!/bin/bash
# Entry point of the Shopsight platform image.
#
# Spark on Kubernetes (spark-operator's SparkApplication) starts its driver and executor pods from this image
# with the arguments `driver ...` and `executor`, and relies on the image to turn them into spark-submit and
# the executor JVM, as Apache Spark's own images do. Any other command runs as given (Ray, MLflow and Feast
# pods set their own `command`, which replaces this entry point altogether).
set -euo pipefail

run() {
  # tini reaps the JVM's and Python workers' children and forwards signals.
  if command -v tini >/dev/null 2>&1; then
    exec tini -s -- "$@"
  fi
  exec "$@"
}

spark_home() {
  : "${SPARK_HOME:?SPARK_HOME must name the pyspark installation (the image sets it)}"
}

case "${1:-}" in
  driver)
    shift
    spark_home
    # Client mode inside the driver pod; the pod's IP is where the executors connect.
    run "${SPARK_HOME}/bin/spark-submit" \
      --conf "spark.driver.bindAddress=${SPARK_DRIVER_BIND_ADDRESS:?set by Spark on Kubernetes}" \
      --deploy-mode client \
      "$@"
    ;;
  executor)
    shift
    spark_home
    classpath="${SPARK_CONF_DIR:-${SPARK_HOME}/conf}:${SPARK_HOME}/jars/*"
    if [ -n "${SPARK_EXTRA_CLASSPATH:-}" ]; then
      classpath="${classpath}:${SPARK_EXTRA_CLASSPATH}"
    fi
    # Spark passes the executor's JVM options as SPARK_JAVA_OPT_0, SPARK_JAVA_OPT_1, ... in order.
    java_opts=()
    while IFS= read -r option; do
      java_opts+=("${option}")
    done < <(env | grep '^SPARK_JAVA_OPT_' | sort -t_ -k4 -n | sed 's/^[^=]*=//' || true)
    run "${JAVA_HOME}/bin/java" "${java_opts[@]}" \
      "-Xms${SPARK_EXECUTOR_MEMORY}" "-Xmx${SPARK_EXECUTOR_MEMORY}" \
      -cp "${classpath}" \
      org.apache.spark.scheduler.cluster.k8s.KubernetesExecutorBackend \
      --driver-url "${SPARK_DRIVER_URL}" \
      --executor-id "${SPARK_EXECUTOR_ID}" \
      --cores "${SPARK_EXECUTOR_CORES}" \
      --app-id "${SPARK_APPLICATION_ID}" \
      --hostname "${SPARK_EXECUTOR_POD_IP}" \
      --resourceProfileId "${SPARK_RESOURCE_PROFILE_ID}" \
      --podName "${SPARK_EXECUTOR_POD_NAME}"
    ;;
  "")
    run shopsight --help
    ;;
  *)
    run "$@"
    ;;
esac
