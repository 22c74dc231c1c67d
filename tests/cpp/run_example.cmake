# Copies examples/cpp out of the repository, as a LibTorch user's own project, then configures it
# against the installed package, builds and runs it; fails on the first step that fails.
string(REPLACE "|" ";" PREFIX_PATH "${PREFIX_PATH}")
string(MD5 suffix "${BINARY_DIR}")
string(SUBSTRING "${suffix}" 0 8 suffix)
set(project_dir "/tmp/torch_mp_example_${suffix}")
file(COPY ${SOURCE_DIR}/ DESTINATION ${project_dir})
execute_process(
  COMMAND ${CMAKE_COMMAND} -S ${project_dir} -B ${BINARY_DIR} -G Ninja "-DCMAKE_PREFIX_PATH=${PREFIX_PATH}"
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
execute_process(COMMAND ${BINARY_DIR}/plan_sequential RESULT_VARIABLE run_result)
if(NOT run_result EQUAL 0)
  message(FATAL_ERROR "the planner example failed: ${run_result}")
endif()
if(TORCHRUN)
  execute_process(
    COMMAND ${TORCHRUN} --standalone --nproc-per-node 2 --no-python ${BINARY_DIR}/tensor_parallel_mlp
    RESULT_VARIABLE torchrun_result TIMEOUT 300)
  if(NOT torchrun_result EQUAL 0)
    message(FATAL_ERROR "torchrun of the tensor-parallel example failed: ${torchrun_result}")
  endif()
  # The pipeline across two ranks, its losses checked against the dense model's, in two schedules.
  foreach(schedule 1f1b zbv)
    execute_process(
      COMMAND ${TORCHRUN} --standalone --nproc-per-node 2 --no-python ${BINARY_DIR}/train_pipeline
              --schedule ${schedule} --steps 5 --check-dense
      RESULT_VARIABLE torchrun_result TIMEOUT 300)
    if(NOT torchrun_result EQUAL 0)
      message(FATAL_ERROR "torchrun of the pipeline example (${schedule}) failed: ${torchrun_result}")
    endif()
  endforeach()
  # A 2-D mesh: two stages, each sharded over two ranks (tensor parallel innermost), four processes.
  execute_process(
    COMMAND ${TORCHRUN} --standalone --nproc-per-node 4 --no-python ${BINARY_DIR}/train_pipeline
            --tp 2 --steps 5 --check-dense
    RESULT_VARIABLE torchrun_result TIMEOUT 300)
  if(NOT torchrun_result EQUAL 0)
    message(FATAL_ERROR "torchrun of the pipeline example at pp 2 x tp 2 failed: ${torchrun_result}")
  endif()
endif()
