# Build-time fixes needed only when ROS 2 comes from the PyPI ros-jazzy-* wheels (no sourced ROS).
# In a sourced ROS install (colcon on the robot) neither condition below holds and this file does
# nothing. Facts behind both fixes: ../shared/reference/ROS_ON_PIP.md (wheel defects 1 and 2).

find_package(Python3 REQUIRED COMPONENTS Interpreter Development NumPy)
execute_process(
  COMMAND "${Python3_EXECUTABLE}" -c "import sys; print(sys.prefix)"
  OUTPUT_VARIABLE _slm_py_prefix OUTPUT_STRIP_TRAILING_WHITESPACE)

# 1. The wheels put the ament index in the interpreter's prefix but nothing points at it.
if(EXISTS "${_slm_py_prefix}/share/ament_index/resource_index/packages/rosidl_default_generators")
  set(_slm_ament "$ENV{AMENT_PREFIX_PATH}")
  if(NOT _slm_ament MATCHES "(^|:)${_slm_py_prefix}(:|$)")
    message(STATUS "slm_ros: ROS 2 from PyPI wheels in ${_slm_py_prefix}; adding it to AMENT_PREFIX_PATH")
    if(_slm_ament)
      set(ENV{AMENT_PREFIX_PATH} "${_slm_py_prefix}:${_slm_ament}")
    else()
      set(ENV{AMENT_PREFIX_PATH} "${_slm_py_prefix}")
    endif()
  endif()
  list(APPEND CMAKE_PREFIX_PATH "${_slm_py_prefix}")
endif()

# 2. Exported *__rosidl_generator_py targets of the message wheels name the wheel builder's Python
#    and NumPy include dirs (/opt/python/...). Point them at this interpreter's at the end of
#    configure, when every imported target exists.
function(_slm_fix_wheel_include_dirs)
  get_property(_targets DIRECTORY "${CMAKE_SOURCE_DIR}" PROPERTY IMPORTED_TARGETS)
  foreach(_t IN LISTS _targets)
    get_target_property(_dirs ${_t} INTERFACE_INCLUDE_DIRECTORIES)
    if(NOT _dirs OR NOT _dirs MATCHES "/opt/python/")
      continue()
    endif()
    set(_fixed "")
    foreach(_d IN LISTS _dirs)
      if(_d MATCHES "^/opt/python/.*numpy")
        list(APPEND _fixed ${Python3_NumPy_INCLUDE_DIRS})
      elseif(_d MATCHES "^/opt/python/")
        list(APPEND _fixed ${Python3_INCLUDE_DIRS})
      else()
        list(APPEND _fixed "${_d}")
      endif()
    endforeach()
    list(REMOVE_DUPLICATES _fixed)
    set_target_properties(${_t} PROPERTIES INTERFACE_INCLUDE_DIRECTORIES "${_fixed}")
  endforeach()
endfunction()
cmake_language(DEFER DIRECTORY "${CMAKE_SOURCE_DIR}" CALL _slm_fix_wheel_include_dirs)

# 3. When the virtual environment lives inside the source tree (./.venv), CMake refuses to export
#    targets whose include dirs (Python, NumPy from the venv) are "prefixed in the source directory".
#    Those dirs are only needed while building here: mark them build-only.
function(_slm_build_only_venv_includes)
  get_property(_targets DIRECTORY "${CMAKE_SOURCE_DIR}" PROPERTY BUILDSYSTEM_TARGETS)
  foreach(_t IN LISTS _targets)
    get_target_property(_dirs ${_t} INTERFACE_INCLUDE_DIRECTORIES)
    if(NOT _dirs OR NOT _dirs MATCHES "${_slm_py_prefix}")
      continue()
    endif()
    set(_fixed "")
    foreach(_d IN LISTS _dirs)
      if(_d MATCHES "^${_slm_py_prefix}/")
        list(APPEND _fixed "$<BUILD_INTERFACE:${_d}>")
      else()
        list(APPEND _fixed "${_d}")
      endif()
    endforeach()
    set_target_properties(${_t} PROPERTIES INTERFACE_INCLUDE_DIRECTORIES "${_fixed}")
  endforeach()
endfunction()
string(FIND "${_slm_py_prefix}/" "${CMAKE_SOURCE_DIR}/" _slm_venv_in_src)
if(_slm_venv_in_src EQUAL 0)
  cmake_language(DEFER DIRECTORY "${CMAKE_SOURCE_DIR}" CALL _slm_build_only_venv_includes)
endif()
