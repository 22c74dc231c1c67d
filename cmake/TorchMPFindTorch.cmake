# find_package(Torch) for a torch taken from a pip wheel. A CUDA wheel's CMake config needs a CUDA
# toolkit and libnvrtc; the wheel carries libnvrtc (site-packages/nvidia/cu*/lib) while a local
# toolkit often does not, so point the config at the wheel's copy when none was given.
if(NOT CUDA_TOOLKIT_ROOT_DIR)
  if(DEFINED ENV{CUDA_HOME})
    set(CUDA_TOOLKIT_ROOT_DIR "$ENV{CUDA_HOME}")
  elseif(EXISTS /usr/local/cuda)
    set(CUDA_TOOLKIT_ROOT_DIR /usr/local/cuda)
  endif()
endif()
if(NOT CUDA_nvrtc_LIBRARY)
  foreach(_prefix IN LISTS CMAKE_PREFIX_PATH)
    file(GLOB _nvrtc "${_prefix}/../../../nvidia/cu*/lib/libnvrtc.so.*[0-9]"
                     "${_prefix}/../../../nvidia/cuda_nvrtc/lib/libnvrtc.so.*[0-9]")
    if(_nvrtc AND NOT EXISTS "${CUDA_TOOLKIT_ROOT_DIR}/lib64/libnvrtc.so")
      list(GET _nvrtc 0 _nvrtc)
      get_filename_component(CUDA_nvrtc_LIBRARY "${_nvrtc}" ABSOLUTE)
      break()
    endif()
  endforeach()
  unset(_nvrtc)
endif()
# Without an arch list torch's config probes the local GPU with a CUDA test program, which fails on
# machines without one; name the architectures instead (override with TORCH_CUDA_ARCH_LIST).
if(NOT DEFINED ENV{TORCH_CUDA_ARCH_LIST} AND NOT TORCH_CUDA_ARCH_LIST)
  set(TORCH_CUDA_ARCH_LIST "8.0;9.0")
endif()
find_package(Torch REQUIRED)
