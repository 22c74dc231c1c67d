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
# A CUDA build of torch (the default wheel on Linux) has a CMake config that stops without a CUDA
# toolkit ("Your installed Caffe2 version uses CUDA but I cannot find the CUDA libraries"), although
# code that uses only its CPU side, as torch_mp without TORCH_MP_WITH_CUDA does, needs none. Look for
# the toolkit as that config does (FindCUDA: nvcc and the CUDA runtime); without one, stand in for
# the one target the config would make of it (torch::cudart: libtorch_cuda loads the wheel's
# libcudart at run time all the same), which skips the config's CUDA search, and say so once.
set(TORCH_MP_NO_CUDA_TOOLKIT OFF)
unset(_torch_mp_torch_lib)
foreach(_dir IN LISTS Torch_DIR CMAKE_PREFIX_PATH)
  foreach(_torch_dir "${_dir}" "${_dir}/Torch")
    if(NOT _torch_mp_torch_lib AND EXISTS "${_torch_dir}/TorchConfig.cmake")
      get_filename_component(_torch_mp_torch_lib "${_torch_dir}/../../../lib" ABSOLUTE)
    endif()
  endforeach()
endforeach()
if(EXISTS "${_torch_mp_torch_lib}/${CMAKE_SHARED_LIBRARY_PREFIX}torch_cuda${CMAKE_SHARED_LIBRARY_SUFFIX}"
   AND NOT TARGET torch::cudart)
  find_package(CUDA QUIET)
  if(NOT CUDA_FOUND)
    set(TORCH_MP_NO_CUDA_TOOLKIT ON)
    message(STATUS "torch_mp: the installed torch is a CUDA build but no CUDA toolkit was found (nvcc and "
                   "the CUDA runtime's headers; set CUDA_HOME to it): building the CPU side only, the CUDA "
                   "side (NCCL groups for C++ programs) is left out; Python is unaffected")
    add_library(torch::cudart INTERFACE IMPORTED)
  endif()
endif()
unset(_torch_mp_torch_lib)
find_package(Torch REQUIRED)
