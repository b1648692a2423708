/* The C API used from C (the header must compile as C): a missing path fails with a status, not an abort. */
#include <stdio.h>

#include "caldera.h"

int caldera_check_from_c(const char *missing_path) {
  caldera_model *m = NULL;
  caldera_status s = caldera_load(missing_path, "cpu", &m);
  printf("error c-path %d %s\n", (int)s, caldera_last_error());
  fflush(stdout);
  caldera_free(m);
  return (int)s;
}
