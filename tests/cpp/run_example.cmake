# Configures, builds and runs examples/cpp; fails on the first step that fails.
string(REPLACE "|" ";" PREFIX_PATH "${PREFIX_PATH}")
execute_process(
  COMMAND ${CMAKE_COMMAND} -S ${SOURCE_DIR} -B ${BINARY_DIR} -G Ninja "-DCMAKE_PREFIX_PATH=${PREFIX_PATH}"
  RESULT_VARIABLE configure_result)
if(NOT configure_result EQUAL 0)
  message(FATAL_ERROR "configuring the example failed: ${configure_result}")
endif()
execute_process(COMMAND ${CMAKE_COMMAND} --build ${BINARY_DIR} RESULT_VARIABLE build_result)
if(NOT build_result EQUAL 0)
  message(FATAL_ERROR "building the example failed: ${build_result}")
endif()
execute_process(COMMAND ${BINARY_DIR}/train_split RESULT_VARIABLE run_result)
if(NOT run_result EQUAL 0)
  message(FATAL_ERROR "the example failed: ${run_result}")
endif()
if(TORCHRUN)
  execute_process(
    COMMAND ${TORCHRUN} --nproc-per-node 2 --master-port 29517 --no-python ${BINARY_DIR}/tensor_parallel_mlp
    RESULT_VARIABLE torchrun_result TIMEOUT 300)
  if(NOT torchrun_result EQUAL 0)
    message(FATAL_ERROR "torchrun of the tensor-parallel example failed: ${torchrun_result}")
  endif()
endif()
